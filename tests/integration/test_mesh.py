"""The five stages as separate OS processes on a real nats-server."""

import asyncio
import signal

import pytest

from services.assemble.stage import DEFAULT_TEMPLATE, render
from services.post.stage import clean
from shared.client import Client
from shared.data import CONTEXT
from shared.envelope import Envelope
from shared.retrieval import Retriever
from shared.topology import Topology
from shared.transport.connection import Bus
from tests.support import (
    STAGE_NAMES,
    StageProcess,
    collect,
    settings_for,
    stage_env,
    wait_until_consuming,
)

SESSIONS = [f"session-{i}" for i in range(6)] + ["with.dots and spaces*>", "会话"]


def expected_output(settings, text: str, session: str) -> str:
    """What the pipeline must answer with the echo worker: the prompt, cleaned."""
    env = Envelope(request_id="x", session_id=session, input=text, created_at=0.0)
    env = CONTEXT.write(env, Retriever.from_file(None).search(text, 2))
    return clean(render(DEFAULT_TEMPLATE, env))


async def publish_all(client: Client, n: int) -> dict[str, tuple[str, str]]:
    sent: dict[str, tuple[str, str]] = {}
    for start in range(0, n, 100):
        batch = []
        for i in range(start, min(n, start + 100)):
            session = SESSIONS[i % len(SESSIONS)]
            text = f"request {i}: how do streams and consumers work?"
            batch.append((session, text))
        ids = await asyncio.gather(*(client.publish(t, s) for s, t in batch))
        sent.update(zip(ids, batch, strict=True))
    return sent


async def check_exactly_once(url, settings, sent, timeout):
    client = await Client.connect(settings, url)
    bus = await Bus.connect(url, name="test-check")
    topology = Topology(settings)
    try:
        try:
            seen = await collect(client, set(sent), timeout)
        except AssertionError as exc:
            dlq_name = topology.stream_name("dlq")
            reasons = await bus.admin.subject_counts(dlq_name, topology.dlq_subject())
            raise AssertionError(f"{exc}; dead letters by subject: {reasons}") from None
        state = await bus.admin.stream_state(topology.stream_name("results"))
    finally:
        await client.close()
        await bus.close()
    duplicates = {rid: len(copies) for rid, copies in seen.items() if len(copies) > 1}
    assert not duplicates, f"results stored more than once: {duplicates}"
    assert set(seen) == set(sent)
    # Every message ever stored raises last_seq: equal counts mean no duplicate was stored.
    assert state.last_seq == len(sent)
    for rid, (session, text) in sent.items():
        result = seen[rid][0]
        assert result.session_id == session
        assert result.output == expected_output(settings, text, session)
        assert result.output.endswith(f"Question: {text}\nAnswer:")
        assert [hop.stage for hop in result.hops] == STAGE_NAMES
    return seen


# Channels hold the whole run: these tests are about exactly-once, not about shedding.
@pytest.mark.parametrize("mesh", [2000], indirect=True)
@pytest.mark.slow
async def test_thousand_requests_through_separate_processes(nats_server, mesh):
    env, procs = mesh()
    settings = settings_for(env)
    client = await Client.connect(settings, nats_server.url)
    try:
        await wait_until_consuming(nats_server.url, settings)
        sent = await publish_all(client, 1000)
    finally:
        await client.close()
    assert len(sent) == 1000
    seen = await check_exactly_once(nats_server.url, settings, sent, timeout=120)
    # Each stage ran as its own process: one instance id per stage, distinct across stages.
    instances = {hop.stage: hop.instance for copies in seen.values() for hop in copies[0].hops}
    assert len(set(instances.values())) == 5
    for stage, proc in procs.items():
        assert f"{stage}-" in instances[stage]
        assert str(proc.proc.pid) in instances[stage]


@pytest.mark.parametrize("mesh", [2000], indirect=True)
@pytest.mark.slow
async def test_stage_restarts_mid_run_lose_nothing(nats_server, mesh):
    # A slow model and a short ack_wait, so the kill lands mid-run and redelivery is quick.
    env, procs = mesh(
        ORCH_STAGES__INFERENCE__OPTIONS__ECHO__TOKEN_DELAY="0.002",
        ORCH_STAGES__INFERENCE__CONCURRENCY="16",
        ORCH_STAGES__INFERENCE__ACK_WAIT="2",
        ORCH_STAGES__POST__ACK_WAIT="2",
    )
    settings = settings_for(env)
    client = await Client.connect(settings, nats_server.url)
    try:
        await wait_until_consuming(nats_server.url, settings)
        sent = await publish_all(client, 1000)
        seen = 0
        async with asyncio.timeout(60):
            async for _ in client.results():
                seen += 1
                if seen == 200:
                    break
        procs["inference"].kill()  # crash: in-flight messages are redelivered after ack_wait
        assert procs["post"].stop() == 0  # graceful: drains, then exits
        procs["inference"].start()
        procs["post"].start()
    finally:
        await client.close()
    await check_exactly_once(nats_server.url, settings, sent, timeout=120)
    assert "stopped" in procs["post"].log()


async def test_sigterm_drains_in_flight_work(nats_server, mesh):
    # ~1 s per request and 4 at a time: SIGTERM lands while the first four are in flight.
    env, procs = mesh(
        ORCH_STAGES__INFERENCE__OPTIONS__ECHO__TOKEN_DELAY="0.02",
        ORCH_STAGES__INFERENCE__CONCURRENCY="4",
    )
    settings = settings_for(env)
    client = await Client.connect(settings, nats_server.url)
    try:
        await wait_until_consuming(nats_server.url, settings)
        sent = await publish_all(client, 20)
        await asyncio.sleep(0.5)
        procs["inference"].signal(signal.SIGTERM)
        assert procs["inference"].wait(30) == 0
        procs["inference"].start()
    finally:
        await client.close()
    seen = await check_exactly_once(nats_server.url, settings, sent, timeout=60)
    log = procs["inference"].log()
    assert "draining" in log
    by_instance: dict[str, int] = {}
    for copies in seen.values():
        instance = next(h.instance for h in copies[0].hops if h.stage == "inference")
        by_instance[instance] = by_instance.get(instance, 0) + 1
    # The stopped instance finished what it held; the restarted one did the rest.
    assert len(by_instance) == 2, by_instance
    assert min(by_instance.values()) >= 1


async def stored_result_message(client: Client, request_id: str):
    """The result as stored in the stream, headers included. A subscriber may see the
    result a moment before the stream has stored it, so this waits for the stored copy."""
    await client.result(request_id, timeout=30)
    async with asyncio.timeout(10):
        while True:
            stored = await client.bus.admin.last_message(
                "ORCH_RESULTS", f"orch.results.{request_id}"
            )
            if stored is not None:
                return stored
            await asyncio.sleep(0.05)


async def test_trace_context_travels_through_every_stage(nats_server, mesh):
    from opentelemetry import context, trace

    env, _ = mesh()
    settings = settings_for(env)
    await wait_until_consuming(nats_server.url, settings)
    parent = trace.SpanContext(
        trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
        span_id=0x00F067AA0BA902B7,
        is_remote=False,
        trace_flags=trace.TraceFlags(1),
    )
    token = context.attach(trace.set_span_in_context(trace.NonRecordingSpan(parent)))
    client = await Client.connect(settings, nats_server.url)
    try:
        rid = await client.publish("traced question", "s")
    finally:
        context.detach(token)
    try:
        stored = await stored_result_message(client, rid)
        untraced = await client.publish("plain question", "s")
        plain = await stored_result_message(client, untraced)
    finally:
        await client.close()
    assert stored is not None and plain is not None
    # No SDK is configured, so each stage's span carries the caller's context unchanged.
    expected = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert stored.headers.get("traceparent") == expected, stored.headers
    assert "traceparent" not in plain.headers


@pytest.mark.slow
async def test_a_nats_server_restart_loses_nothing(nats_binary, tmp_path):
    # Pull requests do not survive the restart: stages must notice and ask again.
    env = stage_env(nats_binary.url)
    procs = [StageProcess(name, env, tmp_path) for name in STAGE_NAMES]
    settings = settings_for(env)
    try:
        client = await Client.connect(settings, nats_binary.url)
        try:
            await wait_until_consuming(nats_binary.url, settings)
            sent = await publish_all(client, 100)
            await collect(client, set(sent), 60)
            nats_binary.stop()
            nats_binary.start()  # same port, same store: the streams are still there
            await wait_until_consuming(nats_binary.url, settings)
            sent.update(await publish_all(client, 100))
        finally:
            await client.close()
        await check_exactly_once(nats_binary.url, settings, sent, timeout=60)
    finally:
        for p in procs:
            p.signal(signal.SIGTERM)
        codes = {p.stage: p.stop() for p in procs}
    assert all(code == 0 for code in codes.values()), codes
