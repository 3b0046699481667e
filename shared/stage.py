"""What a stage is to its author: a factory that builds a handler, with options and a lifecycle.

A handler is a plain async function from the input envelope to its output: an `Envelope` for
the next stage, or, from a last stage, the `Result`. It never publishes, acks or retries; the
runtime (shared.runtime) does all of that, in one place. Raising `Reject` dead-letters the
request at once (it can never succeed); any other exception is retried with backoff.

The pipeline file names the factory (`handler = "package.module:name"`). The runtime calls it
once per stage instance with a `StageContext` and uses what it returns:

- the handler itself;
- an awaitable of the handler (set-up that needs `await`);
- an async context manager yielding the handler: entered before the first message, exited
  after the drain. A model worker is loaded once and closed there; an HTTP client opened
  there is shared by every call of the stage.

`@stage(options=Model)` declares the pydantic model the stage's `options` table is checked
against (at start-up, and by `orchestrator validate`); without it the factory gets the table
as a dict.

    class Options(BaseModel):
        banned: list[str] = []

    @stage(options=Options)
    def moderate(ctx: StageContext[Options]) -> Handler:
        async def handle(request: Envelope) -> Envelope:
            if any(word in OUTPUT.read(request) for word in ctx.options.banned):
                raise Reject("banned word")
            return request
        return handle
"""

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from shared.components import Context, Factory, declare
from shared.envelope import Envelope, Result
from shared.failure import Reject

Handler = Callable[[Envelope], Awaitable[Envelope | Result]]
"""An async function turning an input envelope into the next stage's envelope (or the result)."""


@dataclass(frozen=True, slots=True)
class Partial:
    """A piece of the answer, for the client to see before the result."""

    text: str
    restart: bool = False
    """The pieces before are void: the answer starts over (a stand-in model took over)."""


StreamingHandler = Callable[[Envelope], AsyncIterator[Partial | Envelope | Result]]
"""A handler written as an async generator: it yields `Partial` pieces of the answer as it goes
(the runtime publishes them to the request's token stream when the request asked for it) and
last its output."""


@dataclass(frozen=True, slots=True)
class Streaming:
    """A streaming handler with a plain path beside it, for a stage that can answer both ways.

    Requests that ask for their tokens (`stream`) go to `stream`; the others to `complete`,
    a plain handler giving the same output without a generator's round trip per piece."""

    stream: StreamingHandler
    complete: Handler


StageContext = Context
"""What a stage factory is called with: the stage's name, the instance id and its options."""

__all__ = [
    "Handler", "NoOptions", "Partial", "Reject", "StageContext", "Streaming", "StreamingHandler",
    "stage",
]  # fmt: skip


class NoOptions(BaseModel):
    """The options of a stage that takes none: any key is an error."""

    model_config = ConfigDict(extra="forbid")


def stage(*, options: type[BaseModel] | None = None) -> Callable[[Callable[..., Any]], Factory]:
    """Declare a stage factory, and the model its `options` table is checked against."""
    return declare("stage", options)
