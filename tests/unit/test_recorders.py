"""StageMetrics records what a model reported once per call, under the model's label, through
both backends (the Prometheus instruments and OpenTelemetry's)."""

import time

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from shared.envelope import Envelope, decode, encode, new_request
from shared.metrics import Metrics
from shared.middleware import Call, Outcome
from shared.otelmetrics import otel_recorders
from shared.recorders import StageMetrics

USAGE = {"model": "echo", "pool": "small", "fallback": False, "prompt_tokens": 5,
         "completion_tokens": 7, "ttft_ms": 20.0, "tokens_per_second": 40.0}  # fmt: skip


def request() -> Envelope:
    return decode(encode(new_request("hi", "s")), Envelope, 1 << 20)


async def handle_twice(mw: StageMetrics) -> None:
    """Two calls of a stage that asks a model, then settled as forwarded."""
    for _ in range(2):
        env = request()
        call = Call("inference", "inference-1", env, 1, "orch.inference.0", {}, time.time())

        async def handler(call: Call) -> Envelope:
            return call.request.with_data(usage=USAGE)

        await mw.handle(call, handler)
        mw.settled("inference", env, Outcome("forwarded", 0.001, to="post"))


async def test_prometheus_recorders_count_each_models_tokens_and_times():
    m = Metrics()
    await handle_twice(m.for_stage("inference", "inference-1", last=False)[0])  # type: ignore[arg-type]
    ids = ("inference", "inference-1")
    assert m.tokens.value(*ids, "small", "input").value == 10
    assert m.tokens.value(*ids, "small", "output").value == 14
    assert m.first_token.histogram(*ids, "small").count == 2
    assert m.first_token.histogram(*ids, "small").sum == 0.04
    assert m.token_rate.histogram(*ids, "small").sum == 80.0
    assert m.messages.value(*ids, "forwarded").value == 2
    assert m.in_flight.value(*ids).value == 0
    assert m.handler.histogram(*ids).count == 2


async def test_opentelemetry_recorders_count_each_models_tokens_and_times():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    await handle_twice(StageMetrics(otel_recorders("inference", "inference-1", False, provider)))
    data = reader.get_metrics_data()
    assert data is not None
    points = {
        (metric.name, tuple(sorted((point.attributes or {}).items()))): point
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        for point in metric.data.data_points
    }
    ids = (("model", "small"), ("stage", "inference"), ("stage_instance", "inference-1"))
    tokens = "orchestrator.model.tokens"
    assert points[(tokens, (("direction", "input"), *ids))].value == 10  # type: ignore[attr-defined]
    assert points[(tokens, (("direction", "output"), *ids))].value == 14  # type: ignore[attr-defined]
    ttft = points[("orchestrator.model.time_to_first_token", ids)]
    assert (ttft.count, ttft.sum) == (2, 0.04)  # type: ignore[attr-defined]
    rate = points[("orchestrator.model.tokens_per_second", ids)]
    assert (rate.count, rate.sum) == (2, 80.0)  # type: ignore[attr-defined]
