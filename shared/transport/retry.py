"""Waiting out broker trouble: a call retried with backoff until the server takes it."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from shared.errors import BusError, MessageTooLarge, TopologyError

log = logging.getLogger(__name__)
T = TypeVar("T")

REFUSALS = (TopologyError, MessageTooLarge)
"""Errors no wait fixes: raised at once."""


async def patiently(
    call: Callable[[], Awaitable[T]],
    what: str,
    stopping: Callable[[], bool],
    *,
    cap: float = 5.0,
    between: Callable[[], Awaitable[None]] | None = None,
) -> T:
    """Await `call` until it succeeds, waiting 0.5 s doubling to `cap` after each BusError
    (a server restarting, a leader election, a reconnect); `between` undoes a half-done
    attempt first. A refusal (REFUSALS), and any BusError once `stopping()`, is raised."""
    wait = 0.5
    while True:
        try:
            return await call()
        except REFUSALS:
            raise
        except BusError as exc:
            if stopping():
                raise
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, wait)
            if between is not None:
                await between()
            await asyncio.sleep(wait)
            wait = min(wait * 2, cap)
