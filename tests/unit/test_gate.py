"""The gate that gives suspect messages an exclusive turn."""

import asyncio

from shared.gate import Gate


async def test_shared_holders_run_together():
    gate = Gate()
    assert gate.try_enter() and gate.try_enter()
    gate.leave()
    gate.leave()


async def test_an_exclusive_turn_waits_for_shared_holders_and_keeps_new_ones_out():
    gate = Gate()
    events: list[str] = []
    assert gate.try_enter()

    async def alone() -> None:
        async with gate.exclusive():
            events.append("exclusive in")
            await asyncio.sleep(0.01)
            events.append("exclusive out")

    async def later() -> None:
        await gate.enter()
        events.append("shared in")
        gate.leave()

    turn = asyncio.create_task(alone())
    await asyncio.sleep(0)
    assert not gate.try_enter()  # an exclusive turn is waiting: newcomers queue behind it
    newcomer = asyncio.create_task(later())
    await asyncio.sleep(0.01)
    assert events == []  # the first shared holder is still inside
    gate.leave()
    await asyncio.gather(turn, newcomer)
    assert events == ["exclusive in", "exclusive out", "shared in"]
    assert gate.try_enter()


async def test_exclusive_turns_do_not_overlap():
    gate = Gate()
    inside = 0
    most = 0

    async def alone() -> None:
        nonlocal inside, most
        async with gate.exclusive():
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.001)
            inside -= 1

    await asyncio.gather(*(alone() for _ in range(5)))
    assert most == 1
    assert gate.try_enter()


async def test_a_failing_exclusive_turn_reopens_the_gate():
    gate = Gate()
    try:
        async with gate.exclusive():
            raise RuntimeError("handler died")
    except RuntimeError:
        pass
    assert gate.try_enter()
