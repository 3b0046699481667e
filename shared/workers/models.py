"""Named models for the inference stage: which one answers a request, and who stands in.

The inference stage's options describe its default model (`worker` and that worker's
settings); `models.<name>` adds more, each with the same keys. A request chooses a model by
naming it in `metadata.model`; else the first of `routes` whose `when` holds chooses; else the
default answers. When the chosen model fails (`ModelUnavailable`: down, overloaded, its
circuit breaker open), the models in its `fallback` list are tried in order. The usage a
result carries says which model answered and whether it stood in.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.envelope import Envelope, Usage
from shared.errors import ConfigError
from shared.failure import Reject
from shared.graph import Condition
from shared.workers.base import ModelWorker, load_worker, start
from shared.workers.echo import EchoOptions
from shared.workers.errors import ModelUnavailable
from shared.workers.local import LocalOptions
from shared.workers.openai import OpenAIOptions
from shared.workers.remote import RemoteOptions, RemoteWorker, Requester

DEFAULT = "default"
"""The name of the model the inference options themselves describe."""
REQUEST_KEY = "model"
"""The metadata key by which a request names its model."""


class ModelOptions(BaseModel):
    """One model: its worker, that worker's settings, and who stands in when it fails."""

    model_config = ConfigDict(extra="forbid")
    worker: str = Field(default="echo", min_length=1)
    """A built-in worker ("echo", "openai", "local", "remote") or `package.module:factory`."""
    echo: EchoOptions = EchoOptions()
    """Settings of the echo worker."""
    openai: OpenAIOptions | None = None
    """Settings of the openai worker: any OpenAI-compatible endpoint."""
    local: LocalOptions | None = None
    """Settings of the local worker: a GGUF model run by llama.cpp here (defaults apply)."""
    remote: RemoteOptions | None = None
    """Settings of the remote worker: a model served by `orchestrator worker serve`."""
    custom: dict[str, Any] = Field(default_factory=dict)
    """Passed to your own worker's factory as they are."""
    fallback: list[str] = Field(default_factory=list)
    """Models tried in order when this one fails."""

    @model_validator(mode="after")
    def _worker_has_its_settings(self) -> "ModelOptions":
        if self.worker == "openai" and self.openai is None:
            raise ValueError("worker 'openai' needs its settings: an `openai` table")
        return self

    def build(self, requester: Requester | None = None, prefix: str = "orch") -> ModelWorker:
        """A worker as these options describe it (a remote one asks over `requester`)."""
        if self.worker == "remote":
            if requester is None:
                raise ConfigError("the remote worker needs a NATS connection to ask over")
            return RemoteWorker(self.remote or RemoteOptions(), requester, prefix)
        return load_worker(self.worker, echo=self.echo, openai=self.openai, local=self.local,
                           custom=self.custom)  # fmt: skip


class ModelRoute(BaseModel):
    """Send the requests `when` matches to `model`."""

    model_config = ConfigDict(extra="forbid")
    when: dict[str, Any] = Field(min_length=1)
    """As a stage route's `when` (`metadata.<key>`, `data.<key>`, `session_id`, ...)."""
    model: str


class Restart:
    """Marks, in a model router's stream, that what came before is void: a stand-in model
    starts the answer over."""


RESTART = Restart()


@dataclass(frozen=True, slots=True)
class Answered:
    """Ends a model router's stream: the usage the worker reported, which model answered,
    and whether it stood in for the one chosen."""

    usage: Usage
    pool: str
    fallback: bool


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole answer from a model router: the text, who answered, when the model that
    answered was asked and when its first text came (monotonic seconds; None if none came)."""

    text: str
    answered: Answered
    started: float
    first: float | None


class ModelRouter:
    """The models of one inference stage instance, and the choice between them."""

    def __init__(
        self,
        models: Mapping[str, ModelWorker],
        fallbacks: Mapping[str, list[str]],
        routes: list[ModelRoute],
    ) -> None:
        self.models = dict(models)
        self.fallbacks = dict(fallbacks)
        self.routes = [
            (tuple(_condition(path, value) for path, value in _flat(route.when).items()),
             route.model)
            for route in routes
        ]  # fmt: skip

    def choose(self, request: Envelope) -> str:
        """The model `request` asks for, or the first route's that matches, or the default."""
        asked = request.metadata.get(REQUEST_KEY)
        if asked is not None:
            if asked not in self.models:
                names = ", ".join(sorted(self.models))
                raise Reject(f"metadata.model {asked!r} names no model (models: {names})")
            return str(asked)
        for conditions, model in self.routes:
            if all(c.holds(request) for c in conditions):
                return model
        return DEFAULT

    async def stream(
        self, request: Envelope, prompt: str
    ) -> AsyncIterator[str | Restart | Answered]:
        """The answer of the chosen model, or of the first stand-in that can give one.

        Yields text, RESTART before a stand-in starts over, and last `Answered`.
        ModelUnavailable when every one of them failed.
        """
        chosen = self.choose(request)
        failures: list[str] = []
        for name in self._in_turn(chosen):
            if failures:
                yield RESTART
            try:
                usage = None
                async for item in self.models[name].stream(prompt, session_id=request.session_id):
                    if isinstance(item, Usage):
                        usage = item
                    else:
                        yield item
            except ModelUnavailable as exc:
                failures.append(f"{name}: {exc}")
                continue
            yield Answered(usage or Usage(model=name), name, name != chosen)
            return
        raise _none_answered(failures)

    async def complete(self, request: Envelope, prompt: str) -> Completion:
        """The whole answer of the chosen model, or of the first stand-in that can give one,
        with no pieces handed out on the way. ModelUnavailable when every one failed."""
        chosen = self.choose(request)
        failures: list[str] = []
        for name in self._in_turn(chosen):
            worker, started = self.models[name], time.monotonic()
            try:
                answer = getattr(worker, "complete", None)
                if answer is not None:
                    text, usage = await answer(prompt, session_id=request.session_id)
                    first: float | None = time.monotonic()
                else:
                    text, usage, first = await _gathered(worker, prompt, request.session_id)
            except ModelUnavailable as exc:
                failures.append(f"{name}: {exc}")
                continue
            answered = Answered(usage or Usage(model=name), name, name != chosen)
            return Completion(text, answered, started, first)
        raise _none_answered(failures)

    def _in_turn(self, chosen: str) -> list[str]:
        # The chosen model, then its stand-ins, each once.
        return list(dict.fromkeys([chosen, *self.fallbacks.get(chosen, [])]))

    async def start(self) -> None:
        """Start the workers that need it (a local model loads here), all at once."""
        await asyncio.gather(*(start(worker) for worker in self.models.values()))

    async def aclose(self) -> None:
        """Close every model's worker."""
        for worker in self.models.values():
            await worker.aclose()


async def _gathered(
    worker: ModelWorker, prompt: str, session_id: str
) -> tuple[str, Usage | None, float | None]:
    """A worker's streamed answer in one piece: the text, its Usage, when its first text came."""
    pieces: list[str] = []
    usage, first = None, None
    async for item in worker.stream(prompt, session_id=session_id):
        if isinstance(item, Usage):
            usage = item
        else:
            if first is None:
                first = time.monotonic()
            pieces.append(item)
    return "".join(pieces), usage, first


def _none_answered(failures: list[str]) -> ModelUnavailable:
    """The error when neither the chosen model nor any stand-in answered."""
    return ModelUnavailable("no model could answer: " + "; ".join(failures))


def _flat(when: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in when.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _condition(path: str, value: Any) -> Condition:
    return Condition(
        tuple(path.split(".", 1)), tuple(value) if isinstance(value, list) else (value,)
    )
