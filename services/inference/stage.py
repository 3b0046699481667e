"""inference: run the prompt through the model worker (`data.completion`)."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pydantic import BaseModel, ConfigDict, Field

from shared.data import COMPLETION, PROMPT
from shared.envelope import Envelope
from shared.stage import Handler, StageContext, stage
from shared.workers import EchoOptions, load_worker


class Options(BaseModel):
    """`[stages.inference.options]`: which model worker, and its settings."""

    model_config = ConfigDict(extra="forbid")
    worker: str = Field(default="echo", min_length=1)
    """A built-in worker ("echo") or `package.module:factory` for your own."""
    echo: EchoOptions = EchoOptions()
    """Settings of the echo worker."""
    custom: dict[str, object] = Field(default_factory=dict)
    """Passed to your own worker's factory as they are."""


@stage(options=Options)
@asynccontextmanager
async def inference(ctx: StageContext[Options]) -> AsyncIterator[Handler]:
    """Start the worker once per stage instance; close it after the drain."""
    worker = load_worker(ctx.options.worker, echo=ctx.options.echo, custom=ctx.options.custom)

    async def handle(request: Envelope) -> Envelope:
        prompt = PROMPT.read(request)
        tokens = [t async for t in worker.stream(prompt, session_id=request.session_id)]
        return COMPLETION.write(request, "".join(tokens))

    try:
        yield handle
    finally:
        await worker.aclose()
