"""Session affinity across several instances of a stage, with failover and rebalancing.

Separate processes on a real nats-server: three instances of inference (one of each other
stage), many sessions. Ownership is read from the instances' announcements, affinity from the
instance ids every result records per stage.
"""

import asyncio
import math
import signal
import time

import pytest

from shared.client import Client
from shared.partition import partition_of
from shared.status import coverage, members_by_stage
from shared.topology import Topology
from shared.transport.connection import Bus
from tests.support import StageProcess, collect, settings_for, stage_env, wait_until_consuming

SESSIONS = [f"user-{i}" for i in range(48)]
FAST_FAILOVER = {"ORCH_AFFINITY__HEARTBEAT": "0.5", "ORCH_AFFINITY__FAILOVER_AFTER": "2"}


async def owners(url, settings, stage="inference") -> dict[str, list[int]]:
    async with await Bus.connect(url, name="test-owners") as bus:
        return (await members_by_stage(bus, Topology(settings))).get(stage, {})


async def wait_for_owners(url, settings, count, timeout=30.0) -> dict[str, list[int]]:
    """Until `count` instances announce a full, balanced, non-overlapping split."""
    parts = settings.partitions
    async with asyncio.timeout(timeout):
        while True:
            found = await owners(url, settings)
            held = sorted(p for ps in found.values() for p in ps)
            balanced = bool(found) and max(map(len, found.values())) <= math.ceil(parts / count)
            if len(found) == count and held == list(range(parts)) and balanced:
                async with await Bus.connect(url, name="t") as bus:
                    if all((await coverage(bus, Topology(settings))).values()):
                        return found
            await asyncio.sleep(0.1)


async def send(client, n, start=0, rate=None):
    ids = {}
    for i in range(start, start + n):
        session = SESSIONS[i % len(SESSIONS)]
        ids[await client.publish(f"request {i}", session)] = session
        if rate:
            await asyncio.sleep(1 / rate)
    return ids


def handled_by(results, ids, stage="inference") -> dict[str, set[str]]:
    """session -> the instances of `stage` that handled its requests."""
    out: dict[str, set[str]] = {}
    for rid, session in ids.items():
        hop = next(h for h in results[rid][0].hops if h.stage == stage)
        out.setdefault(session, set()).add(hop.instance)
    return out


def stop_all(procs):
    for p in procs:
        if p.proc and p.proc.poll() is None:
            p.signal(signal.SIGTERM)
    return [p.stop() for p in procs]


@pytest.mark.parametrize("mesh", [5000], indirect=True)
async def test_sessions_stick_and_survive_a_kill(nats_server, mesh, tmp_path):
    env, _ = mesh(**FAST_FAILOVER)
    extra = [StageProcess("inference", env, tmp_path, name=f"inference-{i}") for i in (2, 3)]
    settings = settings_for(env)
    client = await Client.connect(settings, nats_server.url)
    try:
        await wait_until_consuming(nats_server.url, settings)
        before = await wait_for_owners(nats_server.url, settings, 3)
        owner = {p: inst for inst, ps in before.items() for p in ps}

        # Stable membership: every session's requests go to the one owner of its partition.
        first = await send(client, 480)
        seen = await collect(client, set(first), timeout=60)
        for session, instances in handled_by(seen, first).items():
            assert instances == {owner[partition_of(session, settings.partitions)]}, session

        # Kill -9 one of the extra instances (the fixture's own must exit cleanly) while
        # requests keep coming.
        victim = extra[0]
        victim_id = next(i for i in before if f"-{victim.proc.pid}-" in i)
        sending = asyncio.create_task(send(client, 300, start=480, rate=150))
        await asyncio.sleep(0.5)
        victim.kill()
        killed_at = time.monotonic()
        after = await wait_for_owners(nats_server.url, settings, 2, timeout=30)
        failover = time.monotonic() - killed_at
        second = await sending
        seen = await collect(client, set(first) | set(second), timeout=60)
    finally:
        await client.close()
        codes = stop_all(extra[1:])
    async with await Bus.connect(nats_server.url, name="t") as bus:
        stored = (await bus.admin.stream_state("ORCH_RESULTS")).last_seq
    print(f"\nfailover: partitions of the killed instance owned again after {failover:.2f}s "
          f"(failover_after={settings.affinity.failover_after}s); {before} -> {after}")  # fmt: skip
    assert stored == len(first) + len(second)  # every request completed exactly once
    assert victim_id not in after
    for inst, ps in after.items():  # survivors kept what they had
        assert set(before[inst]) <= set(ps)
    assert failover < settings.affinity.failover_after + 5
    # Sessions of the survivors' partitions did not move, before or after the kill.
    for session, instances in handled_by(seen, second).items():
        p = partition_of(session, settings.partitions)
        if owner[p] != victim_id:
            assert instances == {owner[p]}, session
    assert all(code == 0 for code in codes), codes


@pytest.mark.parametrize("mesh", [5000], indirect=True)
async def test_a_new_instance_takes_a_fair_share_and_only_those_sessions_move(
    nats_server, mesh, tmp_path
):
    env, _ = mesh(**FAST_FAILOVER)
    extra = [StageProcess("inference", env, tmp_path, name=f"inference-{i}") for i in (2, 3)]
    settings = settings_for(env)
    client = await Client.connect(settings, nats_server.url)
    try:
        await wait_until_consuming(nats_server.url, settings)
        before = await wait_for_owners(nats_server.url, settings, 3)
        owner = {p: inst for inst, ps in before.items() for p in ps}
        first = await send(client, 240)
        sending = asyncio.create_task(send(client, 300, start=240, rate=150))
        await asyncio.sleep(0.5)
        extra.append(StageProcess("inference", env, tmp_path, name="inference-4"))
        after = await wait_for_owners(nats_server.url, settings, 4, timeout=30)
        second = await sending
        third = await send(client, 240, start=540)
        seen = await collect(client, set(first) | set(second) | set(third), timeout=60)
    finally:
        await client.close()
        codes = stop_all(extra)
    newcomer = next(i for i in after if i not in before)
    moved = {p for p in owner if owner[p] != next(i for i, ps in after.items() if p in ps)}
    assert moved == set(after[newcomer])  # it took exactly its share, nothing else moved
    assert len(after[newcomer]) == settings.partitions // 4
    sessions_moved = {s for s in SESSIONS if partition_of(s, settings.partitions) in moved}
    print(f"\njoin: newcomer took partitions {sorted(moved)}; "
          f"{len(sessions_moved)}/{len(SESSIONS)} sessions moved")  # fmt: skip
    for session, instances in handled_by(seen, first | second | third).items():
        if session not in sessions_moved:
            assert instances == {owner[partition_of(session, settings.partitions)]}, session
        else:
            assert instances <= {owner[partition_of(session, settings.partitions)], newcomer}
    for session, instances in handled_by(seen, third).items():
        p = partition_of(session, settings.partitions)
        assert instances == {next(i for i, ps in after.items() if p in ps)}, session
    assert all(code == 0 for code in codes), codes


async def test_a_consumer_deleted_from_outside_is_recreated(nats_server, mesh):
    # E.g. removed by another instance that wrongly judged this one dead after a stall.
    env, _ = mesh(**FAST_FAILOVER)
    settings = settings_for(env)
    await wait_until_consuming(nats_server.url, settings)
    stream = f"{settings.stream_prefix}_INFERENCE"
    async with await Bus.connect(nats_server.url, name="test") as bus:
        [consumer] = await bus.admin.consumers(stream)
        assert await bus.admin.delete_consumer(stream, consumer.name)
    client = await Client.connect(settings, nats_server.url)
    try:
        result = await client.ask("still there?", "s", timeout=30)
    finally:
        await client.close()
    assert result.output.endswith("Question: still there?\nAnswer:")


async def test_a_restart_under_the_same_name_takes_the_partitions_back_at_once(nats_server, mesh):
    # A silent instance is replaced only after a minute here: whatever completes sooner was
    # handled by the restarted process, which took its predecessor's consumer over.
    env, procs = mesh(ORCH_INSTANCE="{host}-a", ORCH_AFFINITY__FAILOVER_AFTER="60")
    settings = settings_for(env)
    await wait_until_consuming(nats_server.url, settings)
    client = await Client.connect(settings, nats_server.url)
    try:
        before = await send(client, 24)
        await collect(client, set(before), timeout=30)
        inference = procs["inference"]
        inference.kill()
        during = await send(client, 24, start=24)  # wait in inference's channel meanwhile
        restarted = time.monotonic()
        inference.start()
        results = await collect(client, set(during), timeout=30)
        took = time.monotonic() - restarted
    finally:
        await client.close()
    assert all(len(results[rid]) == 1 for rid in during)  # each completed once
    [instance] = {h.instance for rid in during for h in results[rid][0].hops
                  if h.stage == "inference"}  # fmt: skip
    assert instance.startswith("inference-") and instance.endswith("-a")
    assert "taking over the consumer an earlier process of this name left" in inference.log()
    print(f"\nrestart under the same name: all 24 waiting requests done {took:.1f}s after it")


def test_a_second_live_process_with_the_same_name_is_refused(nats_server, tmp_path):
    env = stage_env(nats_server.url, ORCH_INSTANCE="twin", ORCH_AFFINITY__HEARTBEAT="0.3")
    first = StageProcess("post", env, tmp_path, name="first")
    try:
        deadline = time.monotonic() + 30
        while "owns partitions" not in first.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        second = StageProcess("post", env, tmp_path, name="second")
        assert second.wait(60) == 2
        assert "instance name 'post-twin' is in use by a live process" in second.log()
        assert first.proc is not None and first.proc.poll() is None  # left alone
    finally:
        assert first.stop() == 0


async def test_an_instance_stopped_for_a_while_does_not_judge_the_others_silent(
    nats_server, mesh, tmp_path
):
    env, _ = mesh(**FAST_FAILOVER)
    extra = StageProcess("inference", env, tmp_path, name="inference-2")
    settings = settings_for(env)
    try:
        await wait_until_consuming(nats_server.url, settings)
        before = await wait_for_owners(nats_server.url, settings, 2)
        [stopped] = [i for i in before if f"-{extra.proc.pid}-" in i]
        [running] = [i for i in before if i != stopped]
        extra.signal(signal.SIGSTOP)  # past failover_after (2 s): the other takes over
        await asyncio.sleep(4)
        extra.signal(signal.SIGCONT)
        await wait_for_owners(nats_server.url, settings, 2)
    finally:
        [code] = stop_all([extra])
    assert code == 0
    said_by_running = (tmp_path / "inference-1.log").read_text()
    said_by_stopped = (tmp_path / "inference-2-1.log").read_text()
    assert f"{stopped} fell silent" in said_by_running
    # Woken up, the stopped one finds the other's heartbeats unread, not missing.
    assert f"{running} fell silent" not in said_by_stopped, said_by_stopped[-3000:]
