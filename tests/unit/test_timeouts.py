"""Handler timeouts: no call outlives the stage's `timeout`, even one that drops a cancellation."""

import asyncio
import contextlib

import msgspec
import pytest

from shared.envelope import Envelope, new_request
from shared.failure import HandlerTimeout
from shared.middleware import Call, Output
from shared.runtime.timeouts import Timeouts


def a_call() -> Call:
    request = Envelope(**msgspec.structs.asdict(new_request("hi", "s")))
    return Call("inference", "i-1", request, 1, "orch.inference.0", {}, 0.0)


async def test_a_call_past_its_deadline_fails_with_handler_timeout() -> None:
    async def hangs(call: Call) -> Output:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async with Timeouts("inference", 0.2) as timeouts, asyncio.timeout(5):
        with pytest.raises(HandlerTimeout, match=r"took longer than 0\.2s"):
            await timeouts.handle(a_call(), hangs)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_call_that_drops_the_cancellation_is_cancelled_again() -> None:
    dropped = []

    async def drops_one_then_hangs(call: Call) -> Output:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:  # as a library that swallows it would
            dropped.append(True)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async with Timeouts("inference", 0.2) as timeouts, asyncio.timeout(5):
        with pytest.raises(HandlerTimeout):
            await timeouts.handle(a_call(), drops_one_then_hangs)
    assert dropped == [True]
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_call_that_swallows_the_cancellation_and_returns_keeps_its_output() -> None:
    request = a_call()

    async def swallows(call: Call) -> Output:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        return call.request

    async with Timeouts("inference", 0.2) as timeouts, asyncio.timeout(5):
        assert await timeouts.handle(request, swallows) is request.request
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
