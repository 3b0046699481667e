"""Metrics of a stage process, recorded through the middleware seam, exposed for Prometheus.

`Metrics` holds one process's instruments (shared.instruments, in a registry of its own);
each stage instance records through a `StageMetrics` middleware whose label values are bound
once, so a message costs a few counter and histogram updates. The consumer's state (messages
waiting, un-acked, partitions owned) is read from JetStream when the endpoint is scraped
(shared.app.http), not per message.

Names follow Prometheus conventions (base units, `_total` counters); README lists them.
"""

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from shared.instruments import Buckets, Collector, Family, Kind, Value
from shared.middleware import Middleware
from shared.recorders import (
    INSTANCE_LABEL,
    LATENCY_BUCKETS,
    RATE_BUCKETS,
    ModelRecorders,
    Recorders,
    StageMetrics,
)
from shared.telemetry import metrics_on

PREFIX = "orchestrator"


class Metrics:
    """The instruments of one process: every stage instance in it records here."""

    def __init__(self) -> None:
        # Not "instance": Prometheus sets that label to the scraped target's address.
        ids = ("stage", INSTANCE_LABEL)

        def family(name: str, doc: str, kind: Kind, labels: tuple[str, ...] = ids,
                   bounds: tuple[float, ...] = LATENCY_BUCKETS) -> Family:  # fmt: skip
            return Family(f"{PREFIX}_{name}", doc, kind, labels,
                          bounds if kind == "histogram" else ())  # fmt: skip

        self.messages = family("messages", "Messages settled by a stage, by how they left it",
                               "counter", (*ids, "outcome"))  # fmt: skip
        self.dead_letters = family("dead_letters", "Messages dead-lettered, by reason",
                                   "counter", (*ids, "reason"))  # fmt: skip
        self.redeliveries = family("redeliveries", "Handler calls on a message delivered "
                                   "before", "counter")  # fmt: skip
        self.handler = family("handler_duration_seconds", "Time in the stage's handler per "
                              "call", "histogram")  # fmt: skip
        self.queue_wait = family("queue_wait_seconds", "From the moment the previous stage "
                                 "finished (or the client created the request) until this "
                                 "stage received it", "histogram")  # fmt: skip
        self.request = family("request_duration_seconds", "End to end, from the request's "
                              "creation to its result, at the last stage", "histogram")  # fmt: skip
        self.in_flight = family("in_flight", "Handler calls under way", "gauge")
        self.first_token = family("model_time_to_first_token_seconds", "From the model call "
                                  "to its first token", "histogram", (*ids, "model"))  # fmt: skip
        self.token_rate = family("model_tokens_per_second", "Completion tokens per second "
                                 "after the first", "histogram", (*ids, "model"),
                                 RATE_BUCKETS)  # fmt: skip
        self.tokens = family("model_tokens", "Tokens a model read (input) and wrote (output)",
                             "counter", (*ids, "model", "direction"))  # fmt: skip
        self.pending = family("consumer_pending_messages", "Messages waiting in the stage's "
                              "channel for this instance (its partitions)", "gauge")  # fmt: skip
        self.ack_pending = family("consumer_ack_pending_messages", "Messages delivered to "
                                  "this instance and not yet acknowledged", "gauge")  # fmt: skip
        self.partitions = family("partitions_owned", "Partitions of its channel this instance "
                                 "consumes", "gauge")  # fmt: skip
        self.channel = family("channel_messages", "Messages in a partition of the stage's "
                              "channel (waiting or un-acked), from the instance that owns it",
                              "gauge", ("stage", "partition"))  # fmt: skip
        self.families = [f for f in vars(self).values() if isinstance(f, Family)]
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(Collector(self.families))  # type: ignore[arg-type]

    def for_stage(self, stage: str, instance: str, *, last: bool) -> list[Middleware]:
        """The middleware that records one stage instance's calls (`last`: it stores results):
        into this registry, and through OpenTelemetry when an SDK meter provider is set."""
        chain: list[Middleware] = [StageMetrics(prometheus_recorders(self, stage, instance, last))]
        if metrics_on():
            from shared.otelmetrics import otel_recorders

            chain.append(StageMetrics(otel_recorders(stage, instance, last)))
        return chain

    def exposition(self) -> bytes:
        """Everything recorded, in Prometheus's text format."""
        return generate_latest(self.registry)

    def snapshot(self, stage: str, instance: str) -> dict[str, Any]:
        """One instance's counters and histograms as plain JSON-ready values: counts by
        outcome and by dead-letter reason, redeliveries, calls in flight, and for each
        latency its count, sum and cumulative buckets (`[[upper_bound, count], ...]`, the
        last bound "+Inf"), from which a reader takes percentiles over any interval."""
        ids = (stage, instance)

        def by(family: Family) -> dict[str, float]:
            return {key[-1]: child.value for key, child in family.children.items()
                    if key[:2] == ids and isinstance(child, Value)}  # fmt: skip

        def value(family: Family) -> float:
            child = family.children.get(ids)
            return child.value if isinstance(child, Value) else 0.0

        report: dict[str, Any] = {
            "messages": by(self.messages),
            "dead_letters": by(self.dead_letters),
            "redeliveries": value(self.redeliveries),
            "in_flight": value(self.in_flight),
        }
        for family in (self.handler, self.queue_wait, self.request):
            child = family.children.get(ids)
            if isinstance(child, Buckets):
                report[family.name.removeprefix(f"{PREFIX}_")] = {
                    "count": child.count,
                    "sum": child.sum,
                    "buckets": [list(b) for b in child.cumulative()],
                }
        return report


def quantile(buckets: list[list[Any]], q: float) -> float | None:
    """The `q` quantile (0..1) of cumulative `[[upper_bound, count], ...]` buckets, by linear
    interpolation inside the bucket it falls in, as Prometheus's histogram_quantile does;
    None when they count nothing. A quantile in the +Inf bucket is the largest finite bound."""
    if not buckets or not buckets[-1][1]:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank and count > below:
            if bound == "+Inf":
                return lower
            return lower + (float(bound) - lower) * (rank - below) / (count - below)
        if bound != "+Inf":
            lower = float(bound)
        below = count
    return lower


def prometheus_recorders(m: Metrics, stage: str, instance: str, last: bool) -> Recorders:
    """Recorders writing to `m`'s instruments, exposed for Prometheus."""
    ids = (stage, instance)
    in_flight = m.in_flight.value(*ids)
    return Recorders(
        forwarded=m.messages.value(*ids, "forwarded").inc,
        retried=m.messages.value(*ids, "retried").inc,
        dead_lettered=m.messages.value(*ids, "dead_lettered").inc,
        dead_letter=lambda reason: m.dead_letters.value(*ids, reason).inc(),
        redelivered=m.redeliveries.value(*ids).inc,
        enter=in_flight.inc,
        leave=in_flight.dec,
        handler=m.handler.histogram(*ids).observe,
        queue_wait=m.queue_wait.histogram(*ids).observe,
        request=m.request.histogram(*ids).observe if last else None,
        model=lambda model: ModelRecorders(
            input_tokens=m.tokens.value(*ids, model, "input").inc,
            output_tokens=m.tokens.value(*ids, model, "output").inc,
            first_token=m.first_token.histogram(*ids, model).observe,
            token_rate=m.token_rate.histogram(*ids, model).observe,
        ),
    )
