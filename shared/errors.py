"""The project's exceptions: a shallow tree rooted at OrchestratorError."""

from typing import NamedTuple


class OrchestratorError(Exception):
    """Base of every error this project raises on purpose."""


class Problem(NamedTuple):
    """One thing wrong with the configuration: the key it concerns and what is wrong."""

    key: str
    """Dotted, as in the pipeline file (`stages.post.next`), or an environment variable."""
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class ConfigError(OrchestratorError):
    """The configuration is invalid or inconsistent.

    `problems` lists each problem with its key, when the error is about specific keys; the
    message puts them all on one line.
    """

    def __init__(self, message: str, problems: "list[Problem] | None" = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


class BusError(OrchestratorError):
    """Talking to NATS failed."""


class NotConnected(BusError):
    """No NATS server could be reached."""


class TopologyError(BusError):
    """A stream or consumer exists with a configuration that cannot be brought in line."""


class NoSuchStream(BusError):
    """A stream the call needs does not exist (nothing declared the pipeline on this server)."""


class SubjectTaken(TopologyError):
    """Another consumer of a work-queue stream still holds a subject (a partition) we want."""


class Overloaded(BusError):
    """The target stream is full (`discard=new` rejected the publish): back off and retry."""

    def __init__(self, subject: str, detail: str = "") -> None:
        self.subject = subject
        super().__init__(f"stream for {subject!r} is full{': ' + detail if detail else ''}")


class MessageTooLarge(BusError):
    """A message (with its headers) exceeds what the server accepts in one message."""


class PublishTimeout(BusError):
    """The server did not acknowledge a publish in time; it may or may not be stored."""


class InvalidMessage(OrchestratorError):
    """A message could not be decoded into a valid envelope; `reason` says precisely why."""


class ResultTimeout(OrchestratorError):
    """No result arrived for a request within the caller's timeout."""

    def __init__(self, request_id: str, timeout: float) -> None:
        self.request_id = request_id
        super().__init__(f"no result for request {request_id} within {timeout:g}s")


class RequestDeadLettered(OrchestratorError):
    """The request ended in the dead-letter stream, not in a result.

    `status` is the reason (`expired`, `invalid`, `failed`, `backpressure`), `stage` the stage
    that dead-lettered it, `error` why, and `dead_letter_seq` its entry's sequence (for
    `orchestrator dlq show`, and `dlq replay`).
    """

    def __init__(
        self, request_id: str, status: str, stage: str, error: str, dead_letter_seq: int
    ) -> None:
        self.request_id = request_id
        self.status = status
        self.stage = stage
        self.error = error
        self.dead_letter_seq = dead_letter_seq
        super().__init__(
            f"request {request_id} was dead-lettered by {stage} as {status}: {error} "
            f"(dead-letter entry {dead_letter_seq}: orchestrator dlq show {dead_letter_seq})"
        )
