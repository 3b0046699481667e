"""Handler timeouts, the innermost middleware: no call may take longer than the stage's
`timeout`.

A hung handler (a model server that never answers) would hold its slot, and the keep-alive
would hold its message, until the process stops. One watchdog task cancels calls past their
deadline, which is cheaper per message than an asyncio.timeout around each call; the call
then fails with HandlerTimeout and is retried like any other failure.
"""

import asyncio
import contextlib
import time
from types import TracebackType

from shared.failure import HandlerTimeout
from shared.middleware import Call, CallNext, Middleware, Output

WATCHDOG_PERIOD = 0.5
"""How often deadlines are checked: a timeout fires up to this much late."""


class Timeouts(Middleware):
    """Bounds every call to `seconds`; use as an async context manager (it runs a watchdog)."""

    def __init__(self, stage: str, seconds: float) -> None:
        self.stage = stage
        self.seconds = seconds
        self._deadlines: dict[asyncio.Task[object], float] = {}
        # Calls past their deadline -> cancellations the watchdog has sent them so far.
        self._timed_out: dict[asyncio.Task[object], int] = {}
        self._watchdog: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "Timeouts":
        self._watchdog = asyncio.create_task(self._watch(), name=f"watchdog-{self.stage}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog

    async def handle(self, call: Call, call_next: CallNext) -> Output:
        """Make the call under a deadline; HandlerTimeout if the watchdog had to cancel it."""
        task = asyncio.current_task()
        assert task is not None
        self._deadlines[task] = time.monotonic() + self.seconds
        try:
            output = await call_next(call)
        except asyncio.CancelledError:
            sent = self._timed_out.get(task, 0)
            if sent and task.cancelling() == sent:  # only the watchdog's
                for _ in range(sent):
                    task.uncancel()
                raise HandlerTimeout(
                    f"{self.stage} handler took longer than {self.seconds:g}s"
                ) from None
            raise
        else:
            if sent := self._timed_out.get(task):  # the handler swallowed it and returned
                for _ in range(min(sent, task.cancelling())):
                    task.uncancel()
            return output
        finally:
            del self._deadlines[task]
            self._timed_out.pop(task, None)

    async def _watch(self) -> None:
        # While a task is listed in _deadlines it is suspended inside its handler (the entry
        # goes as soon as the handler returns), so the cancellation lands there. A call still
        # going a period later is cancelled again: something in it dropped the cancellation
        # (Python 3.11's asyncio.wait_for does when its future completes at that moment).
        period = min(WATCHDOG_PERIOD, self.seconds / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for task, deadline in list(self._deadlines.items()):
                if deadline <= now:
                    self._timed_out[task] = self._timed_out.get(task, 0) + 1
                    task.cancel()
