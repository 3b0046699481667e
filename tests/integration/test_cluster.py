"""On a three-node JetStream cluster with three replicas, a node lost under load costs nothing.

Real nats-server processes form the cluster on loopback ports; the five stages run as their
own processes and are given every node's URL. Each test prints its figures.
"""

import asyncio
import contextlib
import signal
import time

import nats
import pytest

from shared.client import Client
from shared.envelope import Result
from shared.errors import BusError
from shared.topology import Topology
from shared.transport.api import BucketSpec
from tests.support import (
    STAGE_NAMES,
    StageProcess,
    collect,
    peak_rss_mb,
    settings_for,
    stage_env,
    wait_quiet,
    wait_until_consuming,
)

pytestmark = pytest.mark.slow


async def replicas_of(url: str, names: list[str]) -> dict[str, int]:
    nc = await nats.connect(url.split(","))
    try:
        jsm = nc.jsm()
        return {name: (await jsm.stream_info(name)).config.num_replicas for name in names}
    finally:
        await nc.close()


async def leader_of(url: str, stream: str) -> str:
    nc = await nats.connect(url.split(","))
    try:
        info = await nc.jsm().stream_info(stream)
        assert info.cluster is not None and info.cluster.leader
        return info.cluster.leader
    finally:
        await nc.close()


@pytest.fixture
def cluster_mesh(nats_cluster, tmp_path):
    env = stage_env(nats_cluster.url, ORCH_REPLICAS="3")
    procs = [StageProcess(stage, env, tmp_path) for stage in STAGE_NAMES]
    yield env, procs
    for p in procs:
        if p.proc and p.proc.poll() is None:
            p.signal(signal.SIGTERM)
    codes = {p.stage: p.stop() for p in procs}
    assert all(code == 0 for code in codes.values()), codes


async def test_streams_and_buckets_follow_replicas(nats_cluster, cluster_mesh):
    env, _ = cluster_mesh
    settings = settings_for(env)
    await wait_until_consuming(nats_cluster.url, settings)
    topology = Topology(settings)
    names = [s.name for s in topology.streams()]
    names += [f"KV_{topology.members_bucket()}", f"KV_{topology.attempts_bucket()}"]
    found = await replicas_of(nats_cluster.url, names)
    assert found == dict.fromkeys(names, 3), found


async def test_placement_puts_streams_and_buckets_on_the_tagged_servers(nats_cluster):
    from shared.runtime.group import declare
    from shared.transport.connection import Bus

    settings = settings_for(stage_env(nats_cluster.url, ORCH_PLACEMENT='["node:n1"]'))
    topology = Topology(settings)
    async with await Bus.connect(nats_cluster.url, name="test-placement") as bus:
        await declare(bus, topology)
        kv = await bus.key_value(topology.members())  # placed as the settings say
        await kv.put("k", b"v")
        assert await kv.get("k") == b"v"
    names = [topology.stream_name("inference"), f"KV_{topology.members_bucket()}"]
    assert {name: await leader_of(nats_cluster.url, name) for name in names} == dict.fromkeys(
        names, "n1"
    )
    # Declared again with other tags, the existing streams move to the servers they name.
    moved = Topology(settings_for(stage_env(nats_cluster.url, ORCH_PLACEMENT='["node:n2"]')))
    async with await Bus.connect(nats_cluster.url, name="test-placement") as bus:
        said = await declare(bus, moved)
    assert any("placement" in line for line in said), said
    async with asyncio.timeout(30):  # the server moves them in the background
        while True:
            with contextlib.suppress(AssertionError):  # no leader during the move
                if await leader_of(nats_cluster.url, names[0]) == "n2":
                    break
            await asyncio.sleep(0.2)


async def test_a_bucket_made_with_other_replicas_follows_the_setting(nats_cluster):
    from shared.transport.connection import Bus

    async with await Bus.connect(nats_cluster.url, name="test-bucket-replicas") as bus:
        await bus.key_value(BucketSpec("grown", ttl=10, replicas=1))
        kv = await bus.key_value(BucketSpec("grown", ttl=10, replicas=3))
        async with asyncio.timeout(30):  # the new peers catch up first
            while True:
                try:
                    await kv.put("k", b"v")
                    break
                except BusError:
                    await asyncio.sleep(0.2)
        assert await kv.get("k") == b"v"
        assert await replicas_of(nats_cluster.url, ["KV_grown"]) == {"KV_grown": 3}
        await bus.key_value(BucketSpec("moved", ttl=10))
        await bus.key_value(BucketSpec("moved", ttl=10, placement=("node:n2",)))
        async with asyncio.timeout(30):  # the server moves it in the background
            while True:
                with contextlib.suppress(AssertionError):  # no leader during the move
                    if await leader_of(nats_cluster.url, "KV_moved") == "n2":
                        break
                await asyncio.sleep(0.2)


async def leaders_back(url: str, streams: list[str], since: float) -> float:
    """Seconds after `since` (monotonic) at which every stream and every consumer of these
    streams answered with a leader again."""
    nc = await nats.connect(url.split(","))
    try:
        jsm = nc.jsm()
        while True:
            try:
                for stream in streams:
                    info = await jsm.stream_info(stream)
                    assert info.cluster is not None and info.cluster.leader
                    for consumer in await jsm.consumers_info(stream):
                        assert consumer.cluster is not None and consumer.cluster.leader
                return time.monotonic() - since
            except Exception:
                await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def lose_a_leader(cluster, client, settings, stream: str, n: int, label: str) -> set[str]:
    """Publish `n` requests at 200 a second; at a quarter of them kill the server leading
    `stream`, at three quarters start it again. Returns their ids; prints the figures.

    How long the pipeline took to catch up is measured per request from the later of two
    moments: every stream and consumer having a leader again, and the request being stored
    (a client's publish waits for the intake's leader too)."""
    url, topology = cluster.url, Topology(settings)
    victim = await leader_of(url, stream)
    streams = [spec.name for spec in topology.streams()]
    stored: dict[str, float] = {}
    back: asyncio.Task[float] | None = None
    for i in range(n):
        if i == n // 4:
            cluster.node_named(victim).kill()
            killed, killed_wall = time.monotonic(), time.time()
            await asyncio.sleep(0.5)  # the others have noticed
            back = asyncio.create_task(leaders_back(url, streams, killed))
        if i == 3 * n // 4:
            cluster.node_named(victim).start()
        while True:
            try:
                stored[await client.publish(f"{label} {i}", f"s{i % 40}")] = time.time()
                break
            except Exception:  # the intake's leader may be the one lost: try again
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.005)
    results = await collect(client, set(stored), timeout=120)
    assert back is not None
    leaders = await back
    led_again = killed_wall + leaders
    mine = [results[rid][0] for rid in stored]

    def late(r: Result) -> float:
        return r.completed_at - max(led_again, stored[r.request_id])

    latest = max(mine, key=late)
    catch_up = late(latest)
    slowest = max(mine, key=lambda r: r.completed_at - r.created_at)
    duplicates = sum(len(results[rid]) - 1 for rid in stored)
    print(f"\n{label}: {n} requests at 200/s; {stream}'s leader {victim} killed; lost 0 (each "
          f"has a result), duplicates {duplicates}; every stream "
          f"and consumer led again {leaders:.1f}s after; every request done within "
          f"{catch_up:.1f}s of that (or of being stored, if later); slowest from creation "
          f"{slowest.completed_at - slowest.created_at:.1f}s")  # fmt: skip
    path = ", ".join(f"{h.stage} {h.received - led_again:+.1f}..{h.done - led_again:+.1f}"
                     for h in latest.hops)  # fmt: skip
    print(
        f"  the latest, from leaders back: stored {stored[latest.request_id] - led_again:+.1f}, "
        f"{path}, done {latest.completed_at - led_again:+.1f}"
    )
    return set(stored)


async def test_losing_a_streams_leader_then_another_node_sheds_nothing(nats_cluster, cluster_mesh):
    env, procs = cluster_mesh
    settings = settings_for(env)
    url = nats_cluster.url
    await wait_until_consuming(url, settings)
    topology = Topology(settings)
    client = await Client.connect(settings, url)
    try:
        busiest, entry = topology.stream_name("inference"), topology.stream_name("intake")
        first = await lose_a_leader(nats_cluster, client, settings, busiest, 400, "first loss")
        second = await lose_a_leader(nats_cluster, client, settings, entry, 400, "second loss")
    finally:
        await client.close()
    status = await wait_quiet(url, settings)
    a = status.accounts
    rss = {p.stage: round(peak_rss_mb(p.proc.pid)) for p in procs if p.proc}
    print(f"cluster: completed {a.completed}, dead-lettered {a.dead_lettered}; peak RSS MB {rss}")
    assert len(first | second) == 800
    assert (a.accepted, a.completed, a.dead_lettered, a.in_flight) == (800, 800, 0, 0)
    assert a.balanced  # a second result for a request would show as a surplus
