"""Metrics of a stage process, recorded through the middleware seam, exposed for Prometheus.

`Metrics` holds one process's instruments (a prometheus_client registry of its own); each stage
instance records through a `StageMetrics` middleware whose label values are bound once, so a
message costs a few counter and histogram updates. The consumer's state (messages waiting,
un-acked, partitions owned) is read from JetStream when the endpoint is scraped
(shared.app.http), not per message.

Names follow Prometheus conventions (base units, `_total` counters); README lists them.
"""

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from shared.envelope import Envelope, Result
from shared.middleware import Call, CallNext, Middleware, Outcome, Output

PREFIX = "orchestrator"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0, 120.0)  # fmt: skip
"""Seconds: from a hop's half-millisecond to a slow model's minutes."""
RATE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0)
"""Tokens per second."""


class Metrics:
    """The instruments of one process: every stage instance in it records here."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, ids = self.registry, ("stage", "instance")
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

    def for_stage(self, stage: str, instance: str, *, last: bool) -> "StageMetrics":
        """The middleware that records one stage instance's calls; `last`: it stores results."""
        return StageMetrics(self, stage, instance, last)

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
                if labels.get("stage") != stage or labels.get("instance") != instance:
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


class StageMetrics(Middleware):
    """Records one stage instance's calls and outcomes (its labels bound once)."""

    def __init__(self, metrics: Metrics, stage: str, instance: str, last: bool) -> None:
        self._metrics, self._ids = metrics, (stage, instance)
        ids = self._ids
        self._forwarded = metrics.messages.labels(*ids, "forwarded")
        self._retried = metrics.messages.labels(*ids, "retried")
        self._dead_lettered = metrics.messages.labels(*ids, "dead_lettered")
        self._redelivered = metrics.redeliveries.labels(*ids)
        self._handler = metrics.handler.labels(*ids)
        self._queue_wait = metrics.queue_wait.labels(*ids)
        self._request = metrics.request.labels(*ids) if last else None
        self._in_flight = metrics.in_flight.labels(*ids)

    async def handle(self, call: Call, call_next: CallNext) -> Output:
        """Time the call; count redeliveries; note what a model reported."""
        request = call.request
        previous = request.hops[-1].done if request.hops else request.created_at
        self._queue_wait.observe(max(0.0, call.received - previous))
        if call.attempt > 1:
            self._redelivered.inc()
        self._in_flight.inc()
        start = time.perf_counter()
        try:
            output = await call_next(call)
        finally:
            self._handler.observe(time.perf_counter() - start)
            self._in_flight.dec()
        if isinstance(output, Envelope) and "usage" in output.data:
            if "usage" not in request.data:  # this stage asked a model
                self._model(output.data["usage"])
        elif isinstance(output, Result) and self._request is not None:
            self._request.observe(max(0.0, time.time() - request.created_at))
        return output

    def settled(self, stage: str, request: Envelope | None, outcome: Outcome) -> None:
        """Count how the message left the stage."""
        if outcome.action == "forwarded":
            self._forwarded.inc()
        elif outcome.action == "retried":
            self._retried.inc()
        else:
            self._dead_lettered.inc()
            self._metrics.dead_letters.labels(*self._ids, outcome.reason or "unknown").inc()

    def _model(self, usage: object) -> None:
        if not isinstance(usage, dict):
            return
        model = str(usage.get("pool") or usage.get("model") or "unknown")
        m, ids = self._metrics, self._ids
        for key, direction in (("prompt_tokens", "input"), ("completion_tokens", "output")):
            count = usage.get(key)
            if isinstance(count, int) and count > 0:
                m.tokens.labels(*ids, model, direction).inc(count)
        ttft = usage.get("ttft_ms")
        if isinstance(ttft, int | float):
            m.first_token.labels(*ids, model).observe(ttft / 1000)
        rate = usage.get("tokens_per_second")
        if isinstance(rate, int | float):
            m.token_rate.labels(*ids, model).observe(rate)
