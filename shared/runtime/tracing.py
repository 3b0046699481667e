"""Tracing, the first middleware: every request one trace, a span per stage.

A message carrying W3C trace context continues that trace; one without it starts a new trace
here when an OpenTelemetry SDK is installed (shared.telemetry), so that a request published
by any client is traced. Each stage adds a span `<stage>` under the request's context, whose
context the output carries on (and a dead-letter entry keeps, so a replay continues the same
trace), with two children: `<stage> queue`, from the moment the previous stage finished (or
the request was created) until this one received it, and `<stage> handle`, the handling (a
model call's span sits under it).

Only the OpenTelemetry API is used: with no SDK the caller's context passes through unchanged,
and a message without trace headers skips all of this, so untraced traffic pays nothing.
"""

from collections.abc import Awaitable

from opentelemetry import propagate, trace

from shared.deadletter import TRACEPARENT
from shared.middleware import Call, CallNext, Middleware, Output, waited_since
from shared.telemetry import tracing_on

_tracer = trace.get_tracer("prompt-orchestrator")


class Tracing(Middleware):
    """Runs each call inside a span `<stage>` and carries its context on."""

    def __init__(self) -> None:
        self._roots = tracing_on()  # decided once: the SDK is installed before stages start

    def handle(self, call: Call, call_next: CallNext) -> Awaitable[Output]:  # type: ignore[override]
        """Open the spans, make the call, put the span's context on the output's headers."""
        if TRACEPARENT not in call.headers and not self._roots:
            return call_next(call)  # the untraced call, as it is: no coroutine of ours
        return self._traced(call, call_next)

    async def _traced(self, call: Call, call_next: CallNext) -> Output:
        parent = propagate.extract(call.headers)  # empty: this span starts a new trace
        request = call.request
        received = int(call.received * 1e9)
        waited = waited_since(call)
        since = received if waited is None else int(waited * 1e9)
        with _tracer.start_as_current_span(
            call.stage,
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "process",
                "messaging.destination.name": call.subject,
                "orchestrator.request_id": request.request_id,
                "orchestrator.session_id": request.session_id,
                "orchestrator.instance": call.instance,
                "orchestrator.attempt": call.attempt,
            },
            start_time=min(since, received),
        ) as span:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            # Set before the call: a failure dead-letters the message with this context.
            call.carry = {**(call.carry or {}), **carrier}
            if not span.is_recording():  # not sampled, or no SDK: the context passes on
                return await call_next(call)
            if since < received:  # a replay's wait is unknown: it spent it dead-lettered
                wait = _tracer.start_span(f"{call.stage} queue", start_time=since)
                wait.end(end_time=received)
            with _tracer.start_as_current_span(f"{call.stage} handle", start_time=received):
                return await call_next(call)
