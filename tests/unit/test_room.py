"""Room: the publishers to a full channel take turns instead of each retrying on its own."""

import asyncio

import pytest

from shared.runtime import room as room_module
from shared.runtime.room import Room


async def test_an_open_channel_costs_no_wait() -> None:
    room = Room()
    await asyncio.wait_for(room.wait(10.0), 0.01)
    room.passed()
    assert not room.full


async def test_one_publisher_probes_the_others_queue_and_each_pass_lets_two_go() -> None:
    room = Room()
    probe = asyncio.create_task(room.refused(10.0))  # the first refused: it probes
    await asyncio.sleep(0)
    assert await room.refused(10.0) is False  # a second one does not probe as well
    assert room.full
    waiting = [asyncio.create_task(room.wait(10.0)) for _ in range(5)]
    await asyncio.sleep(0.001)
    assert await probe is True
    assert not any(w.done() for w in waiting)  # nobody goes before the probe got through

    room.passed()  # the probe went through: two more may try
    await asyncio.sleep(0)
    assert [w.done() for w in waiting] == [True, True, False, False, False]
    room.passed()
    room.passed()  # two passed: four more, but only three wait
    await asyncio.sleep(0)
    assert all(w.done() for w in waiting)
    assert not room.full  # nobody waits any more: the next publish goes straight on


async def test_the_pause_between_probes_grows_while_the_channel_stays_full() -> None:
    room = Room()
    loop = asyncio.get_running_loop()
    pauses = []
    for _ in range(7):
        start = loop.time()
        assert await room.refused(10.0)
        pauses.append(loop.time() - start)
    assert pauses[1] > pauses[0] * 1.5
    assert max(pauses) < room_module.PROBE_MAX * 1.5  # capped
    room.passed()  # it went through: the next refusal starts short again
    start = loop.time()
    await room.refused(10.0)
    assert loop.time() - start < pauses[-1] / 2


async def test_a_waiter_waits_while_the_channel_is_probed_and_not_once_probing_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(room_module, "TURN_MAX", 0.05)
    monkeypatch.setattr(room_module, "PROBE_MAX", 0.02)
    room = Room()
    loop = asyncio.get_running_loop()

    async def prober(rounds: int) -> None:
        for _ in range(rounds):
            await room.refused(10.0)

    probing = asyncio.create_task(prober(15))  # refused again and again for about 0.25 s
    await asyncio.sleep(0)
    start = loop.time()
    await asyncio.wait_for(room.wait(10.0), 2.0)
    waited = loop.time() - start
    assert waited > 0.2  # not after TURN_MAX while someone probes
    await probing
    # The prober gave up on its message without passing (it could not be encoded, the stage
    # stopped...): the ones waiting take their turn once nobody has probed for TURN_MAX.
    start = loop.time()
    await asyncio.wait_for(room.wait(10.0), 1.0)
    assert loop.time() - start < 0.2
    await asyncio.wait_for(room.wait(0.01), 1.0)  # nor longer than the caller's own limit


async def test_a_cancelled_waiter_does_not_use_up_a_turn() -> None:
    room = Room()
    room.full = True
    gone = asyncio.create_task(room.wait(10.0))
    stays = asyncio.create_task(room.wait(10.0))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    room.passed()
    await asyncio.sleep(0)
    assert stays.done()
