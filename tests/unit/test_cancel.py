"""Cancelling tasks so that they really end, even when a cancellation is dropped."""

import asyncio

from shared.cancel import cancel_and_wait


async def test_a_task_that_drops_its_cancellation_is_cancelled_again_until_it_ends() -> None:
    answered: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stages: list[str] = []

    async def request_then_listen() -> None:
        # As a client request awaited with wait_for (Python 3.11 drops a cancellation that
        # arrives as the answer does), then a long wait for messages.
        try:
            stages.append(await asyncio.wait_for(answered, 5))
        except asyncio.CancelledError:
            stages.append("cancelled in the request")
            raise
        await asyncio.sleep(3600)

    task = asyncio.create_task(request_then_listen())
    await asyncio.sleep(0)
    answered.set_result("answered")  # the answer and the cancellation in one loop turn
    async with asyncio.timeout(5):  # a single cancel, then an await, can hang here
        await cancel_and_wait([task])
    assert task.cancelled()


async def test_errors_and_finished_tasks_are_left_quietly() -> None:
    async def fail() -> None:
        raise ValueError("boom")

    failed, done = asyncio.create_task(fail()), asyncio.create_task(asyncio.sleep(0))
    await asyncio.sleep(0.01)
    await cancel_and_wait([failed, done])
    assert failed.done() and done.done()
