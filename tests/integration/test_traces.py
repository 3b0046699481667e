"""Every request is one trace, exported over OTLP by stages configured with OTEL_* variables.

The stages run as separate processes with the OpenTelemetry SDK set up from the standard
variables; a collector here, an OTLP/HTTP receiver keeping what it is sent in memory, decodes
the spans and metrics they export.
"""

import asyncio
import itertools
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import nats
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from shared.client import Client
from shared.dlq import DeadLetterQueue, EntryFilter
from shared.envelope import encode, new_request
from shared.topology import Topology
from shared.transport.connection import Bus
from tests.support import (
    STAGE_NAMES,
    StageProcess,
    orchestrator_command,
    settings_for,
    stage_env,
    wait_until_consuming,
)


@dataclass(frozen=True)
class Span:
    """One exported span, as the collector decoded it."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent: str
    start: int
    end: int
    attributes: dict[str, Any]


class Collector:
    """An OTLP/HTTP receiver on 127.0.0.1 that keeps every span and metric name it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.metrics: dict[str, set[str]] = {}  # metric name -> services that sent it
        collector = self

        class Receive(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    collector._spans(body)
                elif self.path == "/v1/metrics":
                    collector._metrics(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Receive)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _spans(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        for rs in request.resource_spans:
            service = _service(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attributes = {a.key: _value(a.value) for a in s.attributes}
                    self.spans.append(Span(service, s.name, s.trace_id.hex(), s.span_id.hex(),
                                           s.parent_span_id.hex(), s.start_time_unix_nano,
                                           s.end_time_unix_nano, attributes))  # fmt: skip

    def _metrics(self, body: bytes) -> None:
        request = ExportMetricsServiceRequest.FromString(body)
        for rm in request.resource_metrics:
            service = _service(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    self.metrics.setdefault(m.name, set()).add(service)

    def trace(self, trace_id: str) -> list[Span]:
        """The spans of one trace received so far."""
        return [s for s in self.spans if s.trace_id == trace_id]

    def stop(self) -> None:
        """Stop receiving."""
        self.server.shutdown()


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


def _service(attributes: Any) -> str:
    return next((_value(a.value) for a in attributes if a.key == "service.name"), "")


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.stop()


def otel_env(collector: Collector) -> dict[str, str]:
    """The standard variables that make a process export to `collector`, at once."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_METRIC_EXPORT_INTERVAL": "500"}  # fmt: skip


async def spans_of(collector: Collector, trace_id: str, wanted: int, timeout: float = 30.0,
                   ) -> list[Span]:  # fmt: skip
    """The trace once it has `wanted` spans."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(found := collector.trace(trace_id)) < wanted:
        assert loop.time() < deadline, f"{len(found)} spans of {wanted}: {found}"
        await asyncio.sleep(0.1)
    return found


def trace_id_of(headers: dict[str, str]) -> str:
    """The trace id of a W3C traceparent header."""
    return headers["traceparent"].split("-")[1]


async def test_a_request_without_trace_context_is_one_trace_of_every_stage(
    nats_server, tmp_path, collector
):
    env = stage_env(nats_server.url, **otel_env(collector))
    # Both ways to run a stage process export alike: `orchestrator run <stage>` for some,
    # `python -m services.<stage>` for the others.
    procs = [StageProcess(s, env, tmp_path, module=i % 2 == 1) for i, s in enumerate(STAGE_NAMES)]
    try:
        settings = settings_for(env)
        topology = Topology(settings)
        await wait_until_consuming(nats_server.url, settings)
        # A plain nats-py client publishes a request with no trace context.
        request = new_request("what is a trace?", "traced-session")
        refused = new_request("which model?", "traced-session", metadata={"model": "missing"})
        nc = await nats.connect(nats_server.url)
        try:
            for r in (request, refused):
                ack = await nc.jetstream().publish(topology.intake_subject(r.session_id),
                                                   encode(r))  # fmt: skip
                assert ack.seq > 0
        finally:
            await nc.close()
        async with await Client.connect(settings, nats_server.url) as client:
            result = await client.result(request.request_id, timeout=60)
            subject = topology.result_subject(request.request_id)
            stored = await client.bus.admin.last_message(topology.stream_name("results"), subject)
        assert result.output
        trace_id = trace_id_of(dict(stored.headers))

        # Three spans a stage (the stage, its queue wait, its handling) and the model call.
        spans = await spans_of(collector, trace_id, 3 * len(STAGE_NAMES) + 1)
        by_name = {s.name: s for s in spans}
        stage_spans = [by_name[name] for name in STAGE_NAMES]
        assert [s.service for s in stage_spans] == [f"orchestrator-{n}" for n in STAGE_NAMES]
        # In order, each a child of the one before; the first is the trace's root.
        assert stage_spans[0].parent == ""
        for before, after in itertools.pairwise(stage_spans):
            assert after.start >= before.start
            assert after.parent == before.span_id, (before, after)
        for stage in stage_spans:
            wait, handle = by_name[f"{stage.name} queue"], by_name[f"{stage.name} handle"]
            assert wait.parent == handle.parent == stage.span_id
            assert stage.start == wait.start <= wait.end <= handle.start <= handle.end
            assert stage.attributes["orchestrator.request_id"] == request.request_id
        model = by_name["chat default"]
        assert model.parent == by_name["inference handle"].span_id
        assert model.attributes["gen_ai.request.model"] == "default"
        assert model.attributes["gen_ai.usage.output_tokens"] > 0

        # Metrics went out over OTLP too, under their OpenTelemetry names.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while len(collector.metrics.get("orchestrator.messages", ())) < len(STAGE_NAMES):
            assert loop.time() < deadline, collector.metrics
            await asyncio.sleep(0.1)
        assert "orchestrator.handler.duration" in collector.metrics
        assert "orchestrator.model.tokens" in collector.metrics

        # The one dead-lettered at inference keeps the trace its stages started.
        bus = await Bus.connect(nats_server.url, name="test-traces")
        try:
            (entry,) = [e async for e in DeadLetterQueue(bus, topology).entries()]
        finally:
            await bus.close()
        assert entry.request_id == refused.request_id
        spans = await spans_of(collector, trace_id_of(entry.headers), 3 * 3 + 1)
        named = {s.name for s in spans if " " not in s.name}
        assert named == {"rag", "assemble", "inference", "chat"}  # the model call that failed
    finally:
        for p in procs:
            p.stop()


async def test_the_client_starts_the_trace_and_replay_keeps_it(nats_server, tmp_path, collector):
    env = stage_env(nats_server.url, **otel_env(collector))
    procs = [StageProcess(s, env, tmp_path) for s in STAGE_NAMES]
    try:
        settings = settings_for(env)
        topology = Topology(settings)
        await wait_until_consuming(nats_server.url, settings)
        # `orchestrator ask` with the SDK configured: its publish is the root span.
        asked = subprocess.run([*orchestrator_command(), "ask", "--json", "traced from the CLI",
                                "--session", "cli-session", "--meta", "model=missing"],
                               env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert asked.returncode == 3, asked.stderr  # dead-lettered: no such model

        bus = await Bus.connect(nats_server.url, name="test-traces")
        try:
            dlq = DeadLetterQueue(bus, topology)
            (entry,) = [e async for e in dlq.entries()]
            trace_id = trace_id_of(entry.headers)
            spans = await spans_of(collector, trace_id, 1 + 3 * 3)  # publish, rag..inference
            root = next(s for s in spans if s.parent == "")
            assert (root.name, root.service) == ("orchestrator publish", "orchestrator")
            assert next(s for s in spans if s.name == "rag").parent == root.span_id

            # The replayed request fails again at inference, in the same trace.
            report = await dlq.replay(EntryFilter(request_id=entry.request_id))
            assert report.replayed == 1
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not (entries := [e async for e in dlq.entries()]):  # stored again, anew
                assert loop.time() < deadline, "the replayed request was not dead-lettered"
                await asyncio.sleep(0.1)
            (again,) = entries
            assert again.seq != entry.seq
            assert trace_id_of(again.headers) == trace_id
            spans = await spans_of(collector, trace_id, 1 + 3 * 3 + 3)
            inference = sorted((s for s in spans if s.name == "inference"), key=lambda s: s.start)
            assert len(inference) == 2
            assert inference[1].start > inference[0].end
        finally:
            await bus.close()
    finally:
        for p in procs:
            p.stop()


async def test_sampling_follows_the_standard_variables(nats_server, tmp_path, collector):
    env = stage_env(nats_server.url, **otel_env(collector), OTEL_TRACES_SAMPLER="always_off")
    procs = [StageProcess(s, env, tmp_path) for s in STAGE_NAMES]
    try:
        settings = settings_for(env)
        topology = Topology(settings)
        await wait_until_consuming(nats_server.url, settings)
        async with await Client.connect(settings, nats_server.url) as client:
            rid = await client.publish("sampled out?", "unsampled")
            await client.result(rid, timeout=60)
            subject = topology.result_subject(rid)
            stored = await client.bus.admin.last_message(topology.stream_name("results"), subject)
        # The trace exists (its context travels, marked not sampled) but nothing records it.
        assert stored is not None
        flags = int(stored.headers["traceparent"].rsplit("-", 1)[1], 16)
        assert flags & 1 == 0  # the W3C "sampled" flag
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while "orchestrator.messages" not in collector.metrics:  # the exporters are running
            assert loop.time() < deadline, collector.metrics
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # longer than the span processor's delay
        assert collector.spans == []
    finally:
        for p in procs:
            p.stop()
