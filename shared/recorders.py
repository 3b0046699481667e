"""What a stage instance records per message, whatever the backend: the `Recorders` it
writes through (labels bound once) and the `StageMetrics` middleware that calls them."""

import time
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from shared.envelope import Envelope, Result
from shared.middleware import Call, CallNext, Middleware, Outcome, Output, waited_since

INSTANCE_LABEL = "stage_instance"
"""The label naming the stage instance (its consumer, `<stage>-<name>`)."""
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)  # fmt: skip
"""Seconds: from a handler's tenth of a millisecond to a slow model's minutes."""
RATE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0)
"""Tokens per second."""


@dataclass(frozen=True, slots=True)
class Recorders:
    """How one stage instance records, its labels bound already: each field is called with the
    value to record (a backend's bound method, so recording costs one call)."""

    forwarded: Callable[[], Any]
    retried: Callable[[], Any]
    dead_lettered: Callable[[], Any]
    dead_letter: Callable[[str], Any]
    """Called with the dead-letter reason."""
    redelivered: Callable[[], Any]
    enter: Callable[[], Any]
    """A handler call starts (in flight + 1)."""
    leave: Callable[[], Any]
    handler: Callable[[float], Any]
    queue_wait: Callable[[float], Any]
    request: Callable[[float], Any] | None
    """End to end: only at a last stage."""
    model: Callable[[str], "ModelRecorders"]
    """The recorders of one model (by its name), made once per model."""


@dataclass(frozen=True, slots=True)
class ModelRecorders:
    """How one stage instance records what one model reported, its labels bound already."""

    input_tokens: Callable[[int], Any]
    output_tokens: Callable[[int], Any]
    first_token: Callable[[float], Any]
    """Called with seconds."""
    token_rate: Callable[[float], Any]
    """Called with tokens per second."""


class StageMetrics(Middleware):
    """Records one stage instance's calls and outcomes through its `Recorders`."""

    def __init__(self, record: Recorders) -> None:
        self._r = record
        self._models: dict[str, ModelRecorders] = {}

    async def handle(self, call: Call, call_next: CallNext) -> Output:
        """Time the call; count redeliveries; note what a model reported."""
        r, request = self._r, call.request
        since = waited_since(call)
        if since is not None:
            r.queue_wait(call.received - since if call.received > since else 0.0)
        if call.attempt > 1:
            r.redelivered()
        r.enter()
        start = perf_counter()
        try:
            output = await call_next(call)
        finally:
            r.handler(perf_counter() - start)
            r.leave()
        if r.request is not None:  # a last stage: its output is the result
            if isinstance(output, Result):
                r.request(max(0.0, time.time() - request.created_at))
        elif isinstance(output, Envelope):
            usage = output.data.get("usage")
            if usage is not None and "usage" not in request.data:  # this stage asked a model
                self._model(usage)
        return output

    def settled(self, stage: str, request: Envelope | None, outcome: Outcome) -> None:
        """Count how the message left the stage."""
        if outcome.action == "forwarded":
            self._r.forwarded()
        elif outcome.action == "retried":
            self._r.retried()
        else:
            self._r.dead_lettered()
            self._r.dead_letter(outcome.reason or "unknown")

    def _model(self, usage: object) -> None:
        if not isinstance(usage, dict):
            return
        model = str(usage.get("pool") or usage.get("model") or "unknown")
        r = self._models.get(model)
        if r is None:
            r = self._models[model] = self._r.model(model)
        count = usage.get("prompt_tokens")
        if isinstance(count, int) and count > 0:
            r.input_tokens(count)
        count = usage.get("completion_tokens")
        if isinstance(count, int) and count > 0:
            r.output_tokens(count)
        ttft = usage.get("ttft_ms")
        if isinstance(ttft, int | float):
            r.first_token(ttft / 1000)
        rate = usage.get("tokens_per_second")
        if isinstance(rate, int | float):
            r.token_rate(rate)
