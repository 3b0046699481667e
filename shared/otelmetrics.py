"""The stage metrics recorded through the OpenTelemetry API too, for OTLP export.

Used when an SDK meter provider is installed (shared.telemetry, from `OTEL_METRICS_EXPORTER`
or an OTLP endpoint). The instruments are the Prometheus ones under OpenTelemetry names that
map back to the same Prometheus names (`orchestrator.handler.duration` in seconds is
`orchestrator_handler_duration_seconds`), with the same `stage` and `stage_instance` attributes.
"""

from functools import partial

from opentelemetry import metrics

from shared.recorders import (
    INSTANCE_LABEL,
    LATENCY_BUCKETS,
    RATE_BUCKETS,
    ModelRecorders,
    Recorders,
)


def otel_recorders(stage: str, instance: str, last: bool,
                   provider: metrics.MeterProvider | None = None) -> Recorders:  # fmt: skip
    """Recorders writing to OpenTelemetry instruments of `provider` (by default the installed
    meter provider)."""
    meter = metrics.get_meter("prompt-orchestrator", meter_provider=provider)
    ids = {"stage": stage, INSTANCE_LABEL: instance}
    messages = meter.create_counter("orchestrator.messages", "{message}",
                                    "Messages settled by a stage, by how they left it")  # fmt: skip
    dead = meter.create_counter("orchestrator.dead_letters", "{message}",
                                "Messages dead-lettered, by reason")  # fmt: skip
    again = meter.create_counter("orchestrator.redeliveries", "{call}",
                                 "Handler calls on a message delivered before")  # fmt: skip
    flight = meter.create_up_down_counter("orchestrator.in_flight", "{call}",
                                          "Handler calls under way")  # fmt: skip

    def seconds(name: str, description: str) -> metrics.Histogram:
        bounds = LATENCY_BUCKETS
        return meter.create_histogram(name, "s", description,
                                      explicit_bucket_boundaries_advisory=bounds)  # fmt: skip

    handler = seconds("orchestrator.handler.duration", "Time in the stage's handler per call")
    wait = seconds("orchestrator.queue_wait", "From the previous stage (or the request's "
                   "creation) until this stage received it")  # fmt: skip
    request = seconds("orchestrator.request.duration", "End to end, at the last stage")
    ttft = seconds("orchestrator.model.time_to_first_token", "From the model call to its "
                   "first token")  # fmt: skip
    rate = meter.create_histogram("orchestrator.model.tokens_per_second", "{token}/s",
                                  "Completion tokens per second after the first",
                                  explicit_bucket_boundaries_advisory=RATE_BUCKETS)  # fmt: skip
    tokens = meter.create_counter("orchestrator.model.tokens", "{token}",
                                  "Tokens a model read (input) and wrote (output)")  # fmt: skip

    def outcome(name: str) -> partial[None]:
        return partial(messages.add, 1, {**ids, "outcome": name})

    return Recorders(
        forwarded=outcome("forwarded"),
        retried=outcome("retried"),
        dead_lettered=outcome("dead_lettered"),
        dead_letter=lambda reason: dead.add(1, {**ids, "reason": reason}),
        redelivered=partial(again.add, 1, ids),
        enter=partial(flight.add, 1, ids),
        leave=partial(flight.add, -1, ids),
        handler=partial(handler.record, attributes=ids),
        queue_wait=partial(wait.record, attributes=ids),
        request=partial(request.record, attributes=ids) if last else None,
        model=lambda model: ModelRecorders(
            input_tokens=partial(_add, tokens, {**ids, "model": model, "direction": "input"}),
            output_tokens=partial(_add, tokens, {**ids, "model": model, "direction": "output"}),
            first_token=partial(ttft.record, attributes={**ids, "model": model}),
            token_rate=partial(rate.record, attributes={**ids, "model": model}),
        ),
    )


def _add(counter: metrics.Counter, attributes: dict[str, str], amount: int) -> None:
    counter.add(amount, attributes)
