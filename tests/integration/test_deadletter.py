"""Backpressure, poison, expiry and replay: every request ends in exactly one place.

Stages run as separate processes on a real nats-server; counts are read from the server.
"""

import asyncio
import json
import signal
import subprocess
import time

import pytest

from shared.client import Client
from shared.dlq import DeadLetterQueue, EntryFilter
from shared.errors import RequestDeadLettered
from shared.topology import COUNTERS, OUTCOMES, Topology
from shared.transport.api import BucketSpec
from shared.transport.connection import Bus
from tests.support import (
    ROOT,
    collect,
    orchestrator_command,
    peak_rss_mb,
    publish_all,
    settings_for,
    wait_quiet,
    wait_until_consuming,
)


async def dead_letters(url, settings, flt=None):
    async with await Bus.connect(url, name="test-dlq") as bus:
        return [e async for e in DeadLetterQueue(bus, Topology(settings)).entries(flt)]


async def results_stored(url, settings):
    """Results ever stored: the results stream's count, less the outcomes of dead-lettered
    requests stored beside them."""
    topology = Topology(settings)
    async with await Bus.connect(url, name="test-results") as bus:
        stored = (await bus.admin.stream_state(f"{settings.stream_prefix}_RESULTS")).last_seq
        counters = topology.stream_name(COUNTERS)
        return stored - await bus.admin.counter(counters, topology.counter_subject(OUTCOMES))


def poison_env(tmp_path, **extra):
    return {
        "ORCH_STAGES__INFERENCE__OPTIONS__WORKER": "tests.workers:poison",
        "POISON_LOG": str(tmp_path / "calls.log"),
        "POISON_CURE": str(tmp_path / "cured"),
        **extra,
    }


def calls(tmp_path) -> list[str]:
    path = tmp_path / "calls.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def test_overload_sheds_with_reason_and_accounts_for_everything(nats_server, mesh):
    # A slow model behind small channels: intake outruns the pipeline by far.
    env, procs = mesh(
        ORCH_STAGES__RAG__CAPACITY="150",
        ORCH_STAGES__INFERENCE__CAPACITY="10",
        ORCH_STAGES__POST__CAPACITY="20",
        ORCH_STAGES__INFERENCE__OPTIONS__ECHO__TOKEN_DELAY="0.004",
        ORCH_STAGES__INFERENCE__CONCURRENCY="4",
        ORCH_STAGES__INFERENCE__MAX_ACK_PENDING="8",
        ORCH_STAGES__ASSEMBLE__SHED_AFTER="0.2",  # sustained overload: shed soon
    )
    settings = settings_for(env)
    await wait_until_consuming(nats_server.url, settings)
    client = await Client.connect(settings, nats_server.url)
    accepted, refused = [], 0
    try:
        for start in range(0, 400, 50):
            requests = [(f"q{i}: what is backpressure?", f"s{i % 9}")
                        for i in range(start, start + 50)]  # fmt: skip
            taken, turned_away = await publish_all(client, requests)
            accepted += taken
            refused += turned_away
    finally:
        await client.close()

    status = await wait_quiet(nats_server.url, settings)
    rss = {stage: peak_rss_mb(p.proc.pid) for stage, p in procs.items()}
    entries = await dead_letters(nats_server.url, settings)
    shed = [e for e in entries if e.reason == "backpressure"]
    completed = await results_stored(nats_server.url, settings)
    a = status.accounts
    print(f"\noverload: published 400, refused at intake {refused}, accepted {len(accepted)}, "
          f"completed {completed}, shed {len(shed)}; peak RSS MB {rss}")  # fmt: skip

    assert len(accepted) + refused == 400
    assert shed, "the small inference channel never filled"
    assert len(shed) == len(entries), {e.reason for e in entries}
    assert all("is full" in e.error for e in shed)
    # Every accepted request ended in exactly one place, and the status agrees.
    assert {e.request_id for e in entries}.isdisjoint(
        await collect_ids(nats_server.url, settings, len(accepted) - len(entries))
    )
    assert completed + len(entries) == len(accepted)
    assert (a.accepted, a.completed, a.dead_lettered, a.in_flight) == (
        len(accepted), completed, len(entries), 0)  # fmt: skip
    assert a.balanced
    inference = next(s for s in status.stages if s.stage == "assemble")
    assert inference.dead_lettered == {"backpressure": len(shed)}
    assert all(mb < 200 for mb in rss.values()), rss

    # A shed request's client is told so, from Python and from the command line.
    client = await Client.connect(settings, nats_server.url)
    try:
        with pytest.raises(RequestDeadLettered) as told:
            await client.result(shed[0].request_id, timeout=5)
    finally:
        await client.close()
    assert (told.value.status, told.value.stage) == ("backpressure", "assemble")
    assert told.value.dead_letter_seq == shed[0].seq and "is full" in told.value.error
    done = subprocess.run([*orchestrator_command(), "result", shed[-1].request_id], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "dead-lettered by assemble as backpressure" in done.stderr


async def collect_ids(url, settings, n):
    client = await Client.connect(settings, url)
    try:
        seen: set[str] = set()
        async with asyncio.timeout(30):
            async for result in client.results():
                seen.add(result.request_id)
                if len(seen) >= n:
                    break
        return seen
    finally:
        await client.close()


async def test_poison_is_dead_lettered_after_max_deliver_then_replayed(nats_server, mesh, tmp_path):
    env, _ = mesh(**poison_env(
        tmp_path,
        ORCH_STAGES__INFERENCE__MAX_DELIVER="3",
        ORCH_STAGES__INFERENCE__BACKOFF="[0.05, 0.1]",
    ))  # fmt: skip
    settings = settings_for(env)
    await wait_until_consuming(nats_server.url, settings)
    client = await Client.connect(settings, nats_server.url)
    try:
        texts = [f"poison pill {i}" if i % 6 == 0 else f"healthy {i}" for i in range(30)]
        ids = {await client.publish(t, f"sess-{i % 4}"): t for i, t in enumerate(texts)}
    finally:
        await client.close()
    poisoned = {rid for rid, t in ids.items() if t.startswith("poison")}

    status = await wait_quiet(nats_server.url, settings)
    entries = await dead_letters(nats_server.url, settings)
    assert {e.request_id for e in entries} == poisoned
    for e in entries:
        assert (e.reason, e.stage, e.delivered) == ("failed", "inference", 3)
        assert e.error == "RuntimeError: poisoned input"
        assert e.subject.startswith("orch.inference.")
        assert json.loads(e.payload)["request_id"] == e.request_id  # original bytes kept
    tries = calls(tmp_path)
    for rid in poisoned:
        assert sum(f"Question: {ids[rid]}\n" in c for c in tries) == 3
    assert status.accounts.balanced
    assert (status.accounts.completed, status.accounts.dead_lettered) == (25, 5)

    # The cause is removed; a replay brings each back exactly once.
    (tmp_path / "cured").touch()
    done = subprocess.run(
        [*orchestrator_command(), "dlq", "replay", "--stage", "inference"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "replayed 5 of 5 entries" in done.stdout
    client = await Client.connect(settings, nats_server.url)
    try:
        for rid in poisoned:
            result = await client.result(rid, timeout=30)
            assert result.output.endswith(f"Question: {ids[rid]}\nAnswer:")
    finally:
        await client.close()
    status = await wait_quiet(nats_server.url, settings)
    assert await dead_letters(nats_server.url, settings) == []
    assert await results_stored(nats_server.url, settings) == 30
    a = status.accounts
    assert (a.accepted, a.completed, a.dead_lettered, a.replayed) == (30, 30, 0, 5)
    assert a.balanced


async def test_a_message_that_kills_its_stage_is_dead_lettered_across_restarts(
    nats_server, mesh, tmp_path
):
    # Each crash ends the process, and with it the consumer that counted the deliveries;
    # every restart is a new instance with a new consumer.
    env, procs = mesh(**poison_env(
        tmp_path,
        ORCH_STAGES__INFERENCE__MAX_DELIVER="3",
        ORCH_STAGES__INFERENCE__BACKOFF="[0.05]",
        # neighbours are under way when it crashes
        ORCH_STAGES__INFERENCE__OPTIONS__CUSTOM__TOKEN_DELAY="0.002",
        ORCH_AFFINITY__HEARTBEAT="0.2",
        ORCH_AFFINITY__FAILOVER_AFTER="1.0",
    ))  # fmt: skip
    settings = settings_for(env)
    await wait_until_consuming(nats_server.url, settings)
    inference = procs["inference"]
    exits: list[int] = []

    async def supervise() -> None:  # restart the stage whenever it dies, as a supervisor does
        while True:
            await asyncio.sleep(0.1)
            assert inference.proc is not None
            if (code := inference.proc.poll()) is not None:
                exits.append(code)
                inference.start()

    supervisor = asyncio.create_task(supervise())
    try:
        client = await Client.connect(settings, nats_server.url)
        try:
            texts = [f"flaky {i}" if i % 8 == 3 else f"healthy {i}" for i in range(24)]
            texts.insert(5, "crash the stage")
            ids = {await client.publish(t, f"sess-{i % 3}"): t for i, t in enumerate(texts)}
        finally:
            await client.close()
        status = await wait_quiet(nats_server.url, settings, timeout=90)
    finally:
        supervisor.cancel()
    crash = next(rid for rid, t in ids.items() if t.startswith("crash"))

    entries = await dead_letters(nats_server.url, settings)
    assert [(e.request_id, e.reason, e.stage) for e in entries] == [(crash, "failed", "inference")]
    assert entries[0].error.startswith("Abandoned: cut off 3 times (at most 3)")
    assert entries[0].delivered == 4
    assert sum("Question: crash the stage\n" in c for c in calls(tmp_path)) == 3
    assert exits == [70, 70, 70]
    # Messages under way beside it were not taken down with it, not even those that also
    # failed once on their own: being cut off by a crash does not spend their retries.
    assert await results_stored(nats_server.url, settings) == 24
    tries = calls(tmp_path)
    for text in ids.values():
        assert sum(f"Question: {text}\n" in c for c in tries) <= 3, text
    a = status.accounts
    assert (a.accepted, a.completed, a.dead_lettered, a.in_flight) == (25, 24, 1, 0)
    assert a.balanced
    async with await Bus.connect(nats_server.url, name="test-attempts") as bus:
        kv = await bus.key_value(BucketSpec(f"{settings.stream_prefix}_ATTEMPTS", ttl=3600))
        assert await kv.items("inference.") == {}  # settled messages leave no record behind


async def test_a_hung_handler_times_out_and_is_dead_lettered(nats_server, mesh, tmp_path):
    env, _ = mesh(**poison_env(
        tmp_path,
        ORCH_STAGES__INFERENCE__TIMEOUT="0.5",
        ORCH_STAGES__INFERENCE__MAX_DELIVER="2",
        ORCH_STAGES__INFERENCE__BACKOFF="[0.05]",
    ))  # fmt: skip
    settings = settings_for(env)
    await wait_until_consuming(nats_server.url, settings)
    client = await Client.connect(settings, nats_server.url)
    try:
        texts = ["hang forever", *(f"healthy {i}" for i in range(10))]
        ids = {await client.publish(t, f"sess-{i % 2}"): t for i, t in enumerate(texts)}
    finally:
        await client.close()
    status = await wait_quiet(nats_server.url, settings, timeout=60)
    hung = next(rid for rid, t in ids.items() if t.startswith("hang"))
    entries = await dead_letters(nats_server.url, settings)
    assert [(e.request_id, e.reason, e.delivered) for e in entries] == [(hung, "failed", 2)]
    assert entries[0].error == "HandlerTimeout: inference handler took longer than 0.5s"
    assert sum("Question: hang forever\n" in c for c in calls(tmp_path)) == 2
    a = status.accounts
    print(
        f"\nhung model call: {len(ids)} requests; completed {a.completed}, dead-lettered "
        f"{a.dead_lettered} ({entries[0].reason}: {entries[0].error}, after "
        f"{entries[0].delivered} attempts); lost {a.accepted - a.completed - a.dead_lettered}"
    )
    assert (a.completed, a.dead_lettered) == (10, 1)


async def test_replay_killed_midway_completes_without_duplicates(nats_server, mesh, tmp_path):
    env, _ = mesh(**poison_env(tmp_path, ORCH_STAGES__INFERENCE__MAX_DELIVER="1"))
    settings = settings_for(env)
    await wait_until_consuming(nats_server.url, settings)
    client = await Client.connect(settings, nats_server.url)
    try:
        ids = {await client.publish(f"poison {i}", f"s{i}"): f"poison {i}" for i in range(40)}
    finally:
        await client.close()
    await wait_quiet(nats_server.url, settings)
    assert len(await dead_letters(nats_server.url, settings)) == 40

    (tmp_path / "cured").touch()
    replay = [*orchestrator_command(), "dlq", "replay"]
    first = subprocess.Popen([*replay, "--rate", "10"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    time.sleep(2.0)
    first.send_signal(signal.SIGKILL)
    first.wait()
    left = len(await dead_letters(nats_server.url, settings))
    assert 0 < left < 40, f"the kill did not land mid-way ({left} left)"

    second = subprocess.run(replay, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert second.returncode == 0, second.stderr
    client = await Client.connect(settings, nats_server.url)
    try:
        await collect(client, set(ids), timeout=60)
    finally:
        await client.close()
    status = await wait_quiet(nats_server.url, settings)
    print(f"\nreplay: killed with {left} of 40 left; second run: {second.stdout.strip()}")
    assert await results_stored(nats_server.url, settings) == 40  # no result stored twice
    tries = calls(tmp_path)
    for text in ids.values():  # one failed attempt, then exactly one replayed attempt
        assert sum(f"Question: {text}\n" in c for c in tries) == 2, text
    assert status.accounts.balanced
    assert status.accounts.replayed == 40


async def test_expired_requests_are_dead_lettered_not_processed(nats_server, mesh, tmp_path):
    # One request at a time, ~0.4 s each: most wait past their deadline in the inference queue.
    env, _ = mesh(**poison_env(
        tmp_path,
        ORCH_STAGES__INFERENCE__OPTIONS__CUSTOM__TOKEN_DELAY="0.05",
        ORCH_STAGES__INFERENCE__CONCURRENCY="1",
        ORCH_STAGES__INFERENCE__BATCH="1",
    ))  # fmt: skip
    settings = settings_for(env)
    await wait_until_consuming(nats_server.url, settings)
    client = await Client.connect(settings, nats_server.url)
    try:
        deadline = time.time() + 1.5
        ids = {
            await client.publish(f"urgent {i}", f"s{i}", deadline=deadline): f"urgent {i}"
            for i in range(12)
        }
        late = await client.publish("already late", "s", deadline=time.time() - 1)
    finally:
        await client.close()
    status = await wait_quiet(nats_server.url, settings)
    entries = await dead_letters(nats_server.url, settings, EntryFilter(reason="expired"))
    expired = {e.request_id for e in entries}
    assert late in expired
    assert next(e for e in entries if e.request_id == late).stage == "rag"
    assert status.accounts.completed == len(ids) - len(expired & set(ids))
    # Those that expired waiting for inference never reached the model; one that expired
    # later (after its model call) is dead-lettered all the same.
    before_model = {e.request_id for e in entries if e.stage == "inference"}
    assert before_model, "no request expired in the inference queue"
    tries = calls(tmp_path)
    for rid in before_model:
        assert not any(f"Question: {ids[rid]}\n" in c for c in tries)
    assert len(tries) == len(ids) - len(before_model)
    assert status.accounts.balanced


async def test_full_dead_letter_stream_holds_messages_until_there_is_room(
    nats_server, mesh, tmp_path
):
    env, _ = mesh(**poison_env(
        tmp_path, ORCH_STAGES__INFERENCE__MAX_DELIVER="1", ORCH_DEAD_LETTER__MAX_MSGS="2"
    ))  # fmt: skip
    settings = settings_for(env)
    await wait_until_consuming(nats_server.url, settings)
    client = await Client.connect(settings, nats_server.url)
    try:
        ids = {await client.publish(f"poison {i}", f"s{i}") for i in range(4)}
    finally:
        await client.close()

    async with asyncio.timeout(30):  # two fit; two are held by the stage, not dropped
        while len(await dead_letters(nats_server.url, settings)) < 2:
            await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    async with await Bus.connect(nats_server.url, name="t") as bus:
        inference = await bus.admin.stream_state("ORCH_INFERENCE")
    assert inference.messages == 2
    assert len(await dead_letters(nats_server.url, settings)) == 2

    purged = subprocess.run([*orchestrator_command(), "dlq", "purge", "--yes"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert purged.stdout.strip() == "purged 2 entries", purged.stderr
    status = await wait_quiet(nats_server.url, settings, timeout=60)
    held = await dead_letters(nats_server.url, settings)
    assert len(held) == 2
    assert {e.request_id for e in held} < ids
    assert all(e.delivered == 1 for e in held)  # held, not redelivered
    a = status.accounts
    assert (a.accepted, a.dead_lettered, a.purged, a.in_flight) == (4, 4, 2, 0)
    assert a.balanced


async def test_input_at_the_servers_size_limit_is_dead_lettered_and_the_stage_lives_on(
    nats_server, mesh
):
    import nats

    env, _ = mesh()
    settings = settings_for(env)
    await wait_until_consuming(nats_server.url, settings)
    nc = await nats.connect(nats_server.url)
    try:
        huge = b"x" * (nc.max_payload - 200)  # fits alone, not with dead-letter headers
        await nc.jetstream().publish("orch.intake.0", huge)
    finally:
        await nc.close()
    client = await Client.connect(settings, nats_server.url)
    try:
        rid = await client.publish("still alive?", "s")
        result = await client.result(rid, timeout=30)  # the stage's connection survived
    finally:
        await client.close()
    assert result.output.endswith("Question: still alive?\nAnswer:")
    await wait_quiet(nats_server.url, settings)
    [entry] = await dead_letters(nats_server.url, settings)
    assert (entry.reason, entry.stage) == ("invalid", "rag")
    assert entry.headers["Orch-Truncated"] == str(len(huge))
    assert 0 < len(entry.payload) < len(huge)
