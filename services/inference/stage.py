"""inference: the prompt's completion from a model (`data.completion`, `data.usage`), in
place of the prompt."""

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import msgspec
from pydantic import Field, model_validator

from shared.data import COMPLETION, PROMPT, USAGE, write_all
from shared.envelope import Envelope
from shared.stage import Partial, StageContext, Streaming, stage
from shared.workers.models import DEFAULT, Answered, ModelOptions, ModelRoute, ModelRouter
from shared.workers.remote import Requester
from shared.workers.spans import ModelSpan


class Options(ModelOptions):
    """`[stages.inference.options]`: the default model (its `worker` and that worker's
    settings), more models by name, and how a request's model is chosen."""

    models: dict[str, ModelOptions] = Field(default_factory=dict)
    """More models by name: `[stages.inference.options.models.<name>]`."""
    routes: list[ModelRoute] = Field(default_factory=list)
    """Rules choosing a model, tried in order (a request's `metadata.model` comes first)."""

    @model_validator(mode="after")
    def _names_are_known(self) -> "Options":
        if DEFAULT in self.models:
            raise ValueError(f"models.{DEFAULT}: the options themselves describe that model")
        known = {DEFAULT, *self.models}
        named = [*self.fallback, *(m for o in self.models.values() for m in o.fallback)]
        named += [route.model for route in self.routes]
        unknown = sorted(set(named) - known)
        if unknown:
            raise ValueError(f"no model named {unknown} (models: {sorted(known)})")
        return self

    def router(self, requester: Requester | None = None, prefix: str = "orch") -> ModelRouter:
        """A router over a worker for every model (remote ones ask over `requester`)."""
        own = ModelOptions.model_validate(self.model_dump(include=set(ModelOptions.model_fields)))
        models = {DEFAULT: own, **self.models}
        return ModelRouter(
            {name: options.build(requester, prefix) for name, options in models.items()},
            {name: options.fallback for name, options in models.items()},
            self.routes,
        )


async def generate(router: ModelRouter, request: Envelope) -> AsyncIterator[Partial | Envelope]:
    """The answer to the request's prompt by the model chosen for it, piece by piece as it is
    generated, then the request with its completion and usage."""
    prompt = PROMPT.read(request)
    started, first = time.monotonic(), None
    pieces: list[str] = []
    streaming = request.stream  # pieces nobody follows are not handed on
    span = ModelSpan.start()
    try:
        async for item in router.stream(request, prompt):
            if isinstance(item, str):
                if first is None:
                    first = time.monotonic()
                pieces.append(item)
                if streaming:
                    yield Partial(item)
            elif isinstance(item, Answered):
                answered = item
            else:  # RESTART: a stand-in starts the answer over
                pieces, started, first = [], time.monotonic(), None
                if streaming:
                    yield Partial("", restart=True)
    except BaseException as exc:
        if span is not None:
            span.failed(exc)
        raise
    yield _answered(request, "".join(pieces), answered, started, first, span)


async def complete(router: ModelRouter, request: Envelope) -> Envelope:
    """The request with the whole completion of its prompt and its usage, as `generate` ends,
    with no pieces on the way: for requests whose tokens nobody follows."""
    span = ModelSpan.start()
    try:
        done = await router.complete(request, PROMPT.read(request))
    except BaseException as exc:
        if span is not None:
            span.failed(exc)
        raise
    return _answered(request, done.text, done.answered, done.started, done.first, span)


def _answered(
    request: Envelope,
    text: str,
    answered: Answered,
    started: float,
    first: float | None,
    span: ModelSpan | None,
) -> Envelope:
    """The request with its completion and usage in place of its prompt."""
    usage = _usage(answered, started, first)
    if span is not None:
        span.answered(usage)
    return write_all(request, {COMPLETION: text, USAGE: usage}, drop=[PROMPT])


def _usage(answered: Answered, started: float, first: float | None) -> dict[str, Any]:
    """The usage the worker reported, with which model answered and how fast, as stored in
    `data.usage` (a Usage's fields; readers check them)."""
    ended = time.monotonic()
    fields = msgspec.structs.asdict(answered.usage)
    fields.update(pool=answered.pool, fallback=answered.fallback)
    if first is not None:
        fields["ttft_ms"] = round((first - started) * 1000, 3)
        tokens = answered.usage.completion_tokens
        if tokens and tokens > 1 and ended > first:
            fields["tokens_per_second"] = round((tokens - 1) / (ended - first), 2)
    return fields


@stage(options=Options)
@asynccontextmanager
async def inference(ctx: StageContext[Options]) -> AsyncIterator[Streaming]:
    """Start every model's worker once per stage instance (a local model loads before the
    first request); close them after the drain."""
    router = ctx.options.router(ctx.requester, ctx.subject_prefix)
    try:
        await router.start()
    except BaseException:
        await router.aclose()
        raise

    try:
        yield Streaming(partial(generate, router), partial(complete, router))
    finally:
        await router.aclose()
