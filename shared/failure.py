"""What to do with a message whose handling failed: a pure function, tested as a table.

The runtime calls `decide` with the error, the attempt number and the stage's retry settings,
and carries out the answer: redeliver after a delay, or dead-letter with a reason.
"""

from dataclasses import dataclass
from enum import StrEnum

from shared.errors import InvalidMessage, OrchestratorError, Overloaded


class Reason(StrEnum):
    """Why a request was dead-lettered (the `Orch-Reason` header)."""

    BACKPRESSURE = "backpressure"
    """The next stage's stream was full."""
    EXPIRED = "expired"
    """The request's deadline had passed before the stage got to it."""
    INVALID = "invalid"
    """The message could not be decoded: not JSON, wrong schema, too big, unknown version."""
    FAILED = "failed"
    """The handler kept failing until the delivery limit, or the stage died handling it."""


class Expired(OrchestratorError):
    """The request's deadline passed before a stage could work on it."""


class Abandoned(OrchestratorError):
    """A message came back more often than the handler may see it: its handling kept dying."""


class HandlerTimeout(OrchestratorError):
    """The handler took longer than the stage's `timeout` on one message (retried)."""


class Reject(OrchestratorError):
    """Raised by a handler for a request that can never succeed: dead-letter it at once."""


@dataclass(frozen=True)
class Retry:
    """Redeliver the message after `delay` seconds."""

    delay: float


@dataclass(frozen=True)
class DeadLetter:
    """Move the message to the dead-letter stream."""

    reason: Reason
    error: str


def describe(error: BaseException) -> str:
    """`Type: message`, the form errors take in dead-letter headers."""
    text = str(error).replace("\r", " ").replace("\n", " ")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def decide(
    error: BaseException, attempt: int, max_deliver: int, backoff: list[float]
) -> Retry | DeadLetter:
    """Choose between a delayed retry and the dead-letter stream for a failed attempt.

    `attempt` counts from 1. Errors that no retry can fix are dead-lettered at once; anything
    else is retried with the backoff schedule until the `max_deliver`-th attempt fails.
    """
    if isinstance(error, InvalidMessage):
        return DeadLetter(Reason.INVALID, str(error))
    if isinstance(error, Overloaded):
        return DeadLetter(Reason.BACKPRESSURE, describe(error))
    if isinstance(error, Expired):
        return DeadLetter(Reason.EXPIRED, str(error))
    if isinstance(error, Reject | Abandoned) or attempt >= max_deliver:
        return DeadLetter(Reason.FAILED, describe(error))
    if not backoff:
        return Retry(0.0)
    return Retry(backoff[min(attempt, len(backoff)) - 1])
