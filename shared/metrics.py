"""Metrics of a stage process, recorded through the middleware seam, exposed for Prometheus.

`Metrics` holds one process's instruments (a prometheus_client registry of its own); each stage
instance records through a `StageMetrics` middleware whose label values are bound once, so a
message costs a few counter and histogram updates. The consumer's state (messages waiting,
un-acked, partitions owned) is read from JetStream when the endpoint is scraped
(shared.app.http), not per message.

Names follow Prometheus conventions (base units, `_total` counters); README lists them.
"""

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from shared.middleware import Middleware
from shared.recorders import (
    INSTANCE_LABEL,
    LATENCY_BUCKETS,
    RATE_BUCKETS,
    Recorders,
    StageMetrics,
)
from shared.telemetry import metrics_on

PREFIX = "orchestrator"


class Metrics:
    """The instruments of one process: every stage instance in it records here."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Not "instance": Prometheus sets that label to the scraped target's address.
        r, ids = self.registry, ("stage", INSTANCE_LABEL)
        self.messages = Counter(f"{PREFIX}_messages", "Messages settled by a stage, by how they "
                                "left it", [*ids, "outcome"], registry=r)  # fmt: skip
        self.dead_letters = Counter(f"{PREFIX}_dead_letters", "Messages dead-lettered, by "
                                    "reason", [*ids, "reason"], registry=r)  # fmt: skip
        self.redeliveries = Counter(f"{PREFIX}_redeliveries", "Handler calls on a message "
                                    "delivered before", ids, registry=r)  # fmt: skip
        self.handler = Histogram(f"{PREFIX}_handler_duration_seconds", "Time in the stage's "
                                 "handler per call", ids, buckets=LATENCY_BUCKETS,
                                 registry=r)  # fmt: skip
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "From the moment the "
                                    "previous stage finished (or the client created the "
                                    "request) until this stage received it", ids,
                                    buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.request = Histogram(f"{PREFIX}_request_duration_seconds", "End to end, from the "
                                 "request's creation to its result, at the last stage", ids,
                                 buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.in_flight = Gauge(f"{PREFIX}_in_flight", "Handler calls under way", ids,
                               registry=r)  # fmt: skip
        self.first_token = Histogram(f"{PREFIX}_model_time_to_first_token_seconds", "From the "
                                     "model call to its first token", [*ids, "model"],
                                     buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.token_rate = Histogram(f"{PREFIX}_model_tokens_per_second", "Completion tokens "
                                    "per second after the first", [*ids, "model"],
                                    buckets=RATE_BUCKETS, registry=r)  # fmt: skip
        self.tokens = Counter(f"{PREFIX}_model_tokens", "Tokens a model read (input) and wrote "
                              "(output)", [*ids, "model", "direction"], registry=r)  # fmt: skip
        self.pending = Gauge(f"{PREFIX}_consumer_pending_messages", "Messages waiting in the "
                             "stage's channel for this instance (its partitions)", ids,
                             registry=r)  # fmt: skip
        self.ack_pending = Gauge(f"{PREFIX}_consumer_ack_pending_messages", "Messages "
                                 "delivered to this instance and not yet acknowledged", ids,
                                 registry=r)  # fmt: skip
        self.partitions = Gauge(f"{PREFIX}_partitions_owned", "Partitions of its channel this "
                                "instance consumes", ids, registry=r)  # fmt: skip
        self.channel = Gauge(f"{PREFIX}_channel_messages", "Messages in a partition of the "
                             "stage's channel (waiting or un-acked), from the instance that "
                             "owns it", ["stage", "partition"], registry=r)  # fmt: skip

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
        messages: dict[str, float] = {}
        reasons: dict[str, float] = {}
        histograms: dict[str, dict[str, Any]] = {}
        scalars: dict[str, float] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                labels = sample.labels
                if labels.get("stage") != stage or labels.get(INSTANCE_LABEL) != instance:
                    continue
                name = sample.name.removeprefix(f"{PREFIX}_")
                if name == "messages_total":
                    messages[labels["outcome"]] = sample.value
                elif name == "dead_letters_total":
                    reasons[labels["reason"]] = sample.value
                elif name in ("redeliveries_total", "in_flight"):
                    scalars[name.removesuffix("_total")] = sample.value
                elif family.type == "histogram" and "model" not in labels:
                    _histogram_sample(histograms, family.name.removeprefix(f"{PREFIX}_"),
                                      sample.name, labels, sample.value)  # fmt: skip
        return {"messages": messages, "dead_letters": reasons, **scalars, **histograms}


def _histogram_sample(into: dict[str, dict[str, Any]], name: str, sample: str,
                      labels: dict[str, str], value: float) -> None:  # fmt: skip
    entry = into.setdefault(name, {"count": 0.0, "sum": 0.0, "buckets": []})
    if sample.endswith("_bucket"):
        bound = labels["le"]
        entry["buckets"].append([bound if bound == "+Inf" else float(bound), value])
    elif sample.endswith("_count"):
        entry["count"] = value
    elif sample.endswith("_sum"):
        entry["sum"] = value


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
    """Recorders writing to `m`'s Prometheus instruments."""
    ids = (stage, instance)
    in_flight = m.in_flight.labels(*ids)
    return Recorders(
        forwarded=m.messages.labels(*ids, "forwarded").inc,
        retried=m.messages.labels(*ids, "retried").inc,
        dead_lettered=m.messages.labels(*ids, "dead_lettered").inc,
        dead_letter=lambda reason: m.dead_letters.labels(*ids, reason).inc(),
        redelivered=m.redeliveries.labels(*ids).inc,
        enter=in_flight.inc,
        leave=in_flight.dec,
        handler=m.handler.labels(*ids).observe,
        queue_wait=m.queue_wait.labels(*ids).observe,
        request=m.request.labels(*ids).observe if last else None,
        tokens=lambda model, direction, n: m.tokens.labels(*ids, model, direction).inc(n),
        first_token=lambda model, s: m.first_token.labels(*ids, model).observe(s),
        token_rate=lambda model, r: m.token_rate.labels(*ids, model).observe(r),
    )
