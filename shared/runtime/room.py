"""Taking turns at a full channel: the publishers of one stage instance to one next channel.

When the next channel is full, every message the stage holds for it would otherwise retry on
its own: either often (each retry a refused publish, costing the server and the stage CPU
that the pipeline needs to drain the channel) or after a growing pause (and the channel,
drained meanwhile, sits empty while they sleep). Instead one publisher probes, at a short
pause that grows while the channel stays full, and the others queue; each publish that goes
through lets two more try, so the flow grows back within a few round trips once the channel
takes messages again, and while it is full one refused publish per pause is all it costs.
"""

import asyncio
import collections
import contextlib

PROBE_FIRST = 0.005
"""Seconds a probe waits after the first refusal."""
PROBE_MAX = 0.1
"""The longest pause between probes."""
TURN_MAX = 1.0
"""A publisher waiting for its turn takes it itself once nobody has probed for this long (the
prober may have given up on its message for another reason)."""


class Room:
    """Turns at one channel: `wait` before each publish, then `passed` or `refused`."""

    __slots__ = ("_pause", "_probed", "_probing", "_queue", "full")

    def __init__(self) -> None:
        self.full = False
        """Whether the last publish was refused and none has gone through since."""
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()
        self._probing = False
        self._probed = 0.0  # when the last probe started (loop time)
        self._pause = PROBE_FIRST

    async def wait(self, limit: float) -> None:
        """Return at once while the channel takes messages; while it is full, when it is
        this publisher's turn, after `limit` seconds, or once nobody has probed for TURN_MAX
        seconds (the prober gave up on its message for another reason)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while self.full:
            left = deadline - loop.time()
            if left <= 0 or loop.time() - self._probed > TURN_MAX:
                return
            turn = loop.create_future()
            self._queue.append(turn)
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, TURN_MAX)):
                        await turn
                        return
            finally:
                if not turn.done():  # timed out or cancelled: leave the queue
                    turn.cancel()

    def passed(self) -> None:
        """A publish went through: let two more try (the channel is not full any more once
        nobody is waiting)."""
        if not self.full:
            return
        self._pause = PROBE_FIRST
        woken = 0
        while self._queue and woken < 2:
            turn = self._queue.popleft()
            if not turn.done():
                turn.set_result(None)
                woken += 1
        if not self._queue:
            self.full = False

    async def refused(self, limit: float) -> bool:
        """A publish was refused for a full channel. True for the one publisher that probes:
        it has paused (the pause grows while the channel stays full) and tries again at once;
        False at once for the others, which `wait` for their turn."""
        self.full = True
        if self._probing:
            return False
        self._probing = True
        self._probed = asyncio.get_running_loop().time()
        try:
            pause = min(self._pause, limit)
            self._pause = min(self._pause * 2, PROBE_MAX)
            await asyncio.sleep(pause)
        finally:
            self._probing = False
        return True
