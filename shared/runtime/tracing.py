"""Tracing, the first middleware: a span per stage, child of the caller's W3C trace context.

Only the OpenTelemetry API is used: with no SDK configured the span records nothing and the
caller's context passes through unchanged. A message without trace headers skips all of
this, so untraced traffic pays nothing.
"""

from collections.abc import Awaitable

from opentelemetry import propagate, trace

from shared.deadletter import TRACEPARENT
from shared.middleware import Call, CallNext, Middleware, Output

_tracer = trace.get_tracer("prompt-orchestrator")


class Tracing(Middleware):
    """Runs each traced call inside a span `<stage> process` and carries its context on."""

    def handle(self, call: Call, call_next: CallNext) -> Awaitable[Output]:  # type: ignore[override]
        """Open the span, make the call, put the span's context on the output's headers."""
        if TRACEPARENT not in call.headers:
            return call_next(call)  # the untraced call, as it is: no coroutine of ours
        return self._traced(call, call_next)

    async def _traced(self, call: Call, call_next: CallNext) -> Output:
        parent = propagate.extract(call.headers)
        with _tracer.start_as_current_span(
            f"{call.stage} process",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": call.subject,
                "orchestrator.request_id": call.request.request_id,
                "orchestrator.instance": call.instance,
            },
        ):
            output = await call_next(call)
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            call.carry = {**(call.carry or {}), **carrier}
        return output
