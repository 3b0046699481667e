"""A circuit breaker: after repeated failures a backend is not called for a while.

Closed: calls go through; `threshold` consecutive failures open it. Open: calls fail at once
for `reset_after` seconds. Then half-open: one call goes through as a probe; its success
closes the breaker, its failure opens it again. Pure: the clock is passed in.
"""

import time
from collections.abc import Callable


class CircuitBreaker:
    """The state of one backend's breaker."""

    def __init__(
        self, threshold: int, reset_after: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = threshold
        self.reset_after = reset_after
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        """`closed`, `open` or `half-open`."""
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at < self.reset_after or self._probing:
            return "open"
        return "half-open"

    def allow(self) -> bool:
        """Whether a call may go through now (a half-open breaker lets one probe through)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half-open":
            self._probing = True
            return True
        return False

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self.reset_after - (self._clock() - self._opened_at))

    def succeeded(self) -> None:
        """A call succeeded: close."""
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def failed(self) -> None:
        """A call failed: count it; open after `threshold` in a row, or at a failed probe."""
        self._failures += 1
        if self._probing or self._failures >= self.threshold:
            self._opened_at = self._clock()
            self._probing = False
