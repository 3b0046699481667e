"""The span of a model call: which model, how many tokens, how fast (OpenTelemetry GenAI
semantic conventions where they have a name for it)."""

from typing import Any

from opentelemetry import trace

_tracer = trace.get_tracer("prompt-orchestrator")


class ModelSpan:
    """A `chat <model>` span under the stage's current span, ended by `answered` or `failed`.

    It is not made current: the model's own stream is iterated across the handler's yields.
    """

    def __init__(self, span: trace.Span) -> None:
        self._span = span

    @classmethod
    def start(cls) -> "ModelSpan | None":
        """A span for the call about to start; None when the request is not traced."""
        if not trace.get_current_span().is_recording():
            return None
        span = _tracer.start_span("chat", kind=trace.SpanKind.CLIENT,
                                  attributes={"gen_ai.operation.name": "chat"})  # fmt: skip
        return cls(span)

    def answered(self, usage: dict[str, Any]) -> None:
        """End the span with what the model reported (`data.usage`'s fields)."""
        span = self._span
        pool = usage.get("pool") or usage.get("model") or "unknown"
        span.update_name(f"chat {pool}")
        for key, name in (
            ("pool", "gen_ai.request.model"),
            ("model", "gen_ai.response.model"),
            ("prompt_tokens", "gen_ai.usage.input_tokens"),
            ("completion_tokens", "gen_ai.usage.output_tokens"),
            ("fallback", "orchestrator.model.fallback"),
            ("ttft_ms", "orchestrator.model.time_to_first_token_ms"),
            ("tokens_per_second", "orchestrator.model.tokens_per_second"),
        ):
            value = usage.get(key)
            if value is not None:
                span.set_attribute(name, value)
        span.end()

    def failed(self, exc: BaseException) -> None:
        """End the span as failed."""
        self._span.record_exception(exc)
        self._span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
        self._span.end()
