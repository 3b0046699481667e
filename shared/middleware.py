"""The middleware seam: code that wraps every handler call of a stage.

A `Middleware` sees each call (`Call`: the decoded request, the attempt, the input message's
subject and headers) in `handle`, which runs the rest of the chain with `call_next(call)` and
may act before and after it, time it, or replace its outcome by raising. `settled` is told how
each message left the stage (`Outcome`: forwarded, retried or dead-lettered, with the reason
and the seconds it spent in the stage), including messages that never reached a handler.

The chain, outermost first: tracing, then the pipeline file's `[[middleware]]` in the order
given, then the stage's `timeout`, then the handler. A middleware is made by a factory named
in the pipeline file, called once per stage instance like a stage factory (shared.stage):
it returns the middleware, an awaitable of it, or an async context manager yielding it.

    @middleware()
    def timing(ctx: MiddlewareContext[dict]) -> Middleware:
        return Timing()

    class Timing(Middleware):
        async def handle(self, call: Call, call_next: CallNext) -> Output:
            start = time.perf_counter()
            try:
                return await call_next(call)
            finally:
                log.info("%s took %.3fs", call.stage, time.perf_counter() - start)
"""

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel

from shared.components import Context, Factory, declare
from shared.deadletter import REPLAY_OF
from shared.envelope import Envelope, Result

Output = Envelope | Result
CallNext = Callable[["Call"], Awaitable[Output]]

MiddlewareContext = Context
"""What a middleware factory is called with: the stage, the instance id and its options."""


@dataclass(slots=True)
class Call:
    """One handler call: what a middleware sees of it."""

    stage: str
    instance: str
    request: Envelope
    attempt: int
    """1 for the first attempt at this stage, counted across instances and restarts."""
    subject: str
    """The subject the input message was read from."""
    headers: Mapping[str, str]
    """The input message's headers (e.g. W3C trace context)."""
    received: float
    """Unix time the stage received the message."""
    carry: dict[str, str] | None = None
    """Headers to put on the output message (how tracing passes its context on)."""


class Outcome(NamedTuple):
    """How a message left the stage (immutable: every observer sees the same one)."""

    action: Literal["forwarded", "retried", "dead_lettered"]
    seconds: float
    """From receipt to settlement."""
    to: str | None = None
    """Forwarded: the next stage, or None when the output was stored as the result."""
    reason: str | None = None
    """Dead-lettered: `backpressure`, `expired`, `invalid` or `failed`."""
    error: str | None = None
    """Retried or dead-lettered: what went wrong."""
    delay: float | None = None
    """Retried: seconds until the next attempt."""


class Middleware:
    """Base class of middleware: override `handle`, `settled` or both.

    `handle` is usually an `async def`; a plain `def` that returns an awaitable works too
    (tracing does that, so that a call it has nothing to do for costs no coroutine).
    """

    async def handle(self, call: Call, call_next: CallNext) -> Output:
        """Wrap one handler call; the default just makes it."""
        return await call_next(call)

    def settled(self, stage: str, request: Envelope | None, outcome: Outcome) -> None:
        """How a message left `stage`; `request` is None when it could not be decoded.

        Called on the stage's event loop after the message was settled: keep it quick.
        """


def middleware(
    *, options: type[BaseModel] | None = None
) -> Callable[[Callable[..., Any]], Factory]:
    """Declare a middleware factory, and the model its `options` table is checked against."""
    return declare("middleware", options)


def compose(chain: Sequence[Middleware], innermost: CallNext) -> CallNext:
    """The call that runs `chain` (outermost first) around `innermost`, the handler's call.

    A middleware that does not override `handle` is left out of the chain: it costs nothing
    per call.
    """
    call_next: CallNext = innermost
    for mw in reversed(chain):
        if type(mw).handle is not Middleware.handle:
            call_next = _bind(mw, call_next)
    return call_next


def _bind(mw: Middleware, call_next: CallNext) -> CallNext:
    handle = mw.handle

    def run(call: Call) -> Awaitable[Output]:
        return handle(call, call_next)

    return run


def observers(chain: Sequence[Middleware]) -> list[Middleware]:
    """The middleware in `chain` that override `settled`."""
    return [mw for mw in chain if type(mw).settled is not Middleware.settled]


def waited_since(call: Call) -> float | None:
    """Unix time the call's message started waiting for this stage: when the stage before
    finished with it, or, at the first stage, when the request was created. None for a
    replay: it spent the time since in the dead-letter stream, not waiting for this stage."""
    if REPLAY_OF in call.headers:
        return None
    request = call.request
    return request.hops[-1].done if request.hops else request.created_at
