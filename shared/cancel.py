"""Cancelling tasks so that they really end."""

import asyncio
from collections.abc import Iterable
from typing import Any

RECANCEL_EVERY = 0.1
"""Seconds between cancellations of a task that goes on."""


async def cancel_and_wait(tasks: Iterable["asyncio.Task[Any]"]) -> None:
    """Cancel `tasks` and return once every one has ended, cancelling again any that goes on.

    On Python 3.11, `asyncio.wait_for` (which nats-py awaits on every request) drops a
    cancellation that arrives as the future it waits for completes: the task carries on, and
    a plain cancel-then-await can wait for it forever. Their results and errors are dropped.
    """
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_EVERY)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: asyncio would log it as never retrieved
