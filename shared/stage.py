"""What a stage is: a name, the channel it reads, the channel it writes, and a pure handler.

A handler is a plain async function from an input envelope to an output model. It never
publishes or acks: the runtime (shared.runtime) does all I/O, in one place.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pydantic import BaseModel

from shared.envelope import Envelope
from shared.settings import Settings

Handler = Callable[[Envelope], Awaitable[BaseModel]]
"""An async function turning an input envelope into the next stage's message."""

RESULTS = "results"
"""The output channel of the last stage: the results stream, keyed by request id."""


@dataclass(frozen=True)
class StageSpec:
    """The declaration of a stage: where it reads, where it writes, how to build its handler."""

    name: str
    input: str
    output: str
    build: Callable[[Settings], Handler]
    """Called once at start-up with the loaded settings; returns the handler."""
