"""Faults under load: every request still ends in exactly one place, and none is shed.

Real processes on loopback: a nats-server with file storage and the five stages, each started
under a stable instance name (as compose or `up --instances` restart them). Requests flow at a
steady rate while every stage, in a random order at random moments (the seed is printed;
CHAOS_SEED repeats a run), is killed with SIGKILL and started again, then the server itself.
Each test prints its figures.
"""

import asyncio
import os
import random
import time

import pytest

from shared.client import Client
from shared.dlq import DeadLetterQueue
from shared.envelope import new_request_id
from shared.topology import Topology
from shared.transport.connection import Bus
from tests.support import (
    STAGE_NAMES,
    peak_rss_mb,
    publish_all,
    settings_for,
    wait_quiet,
    wait_until_consuming,
)

pytestmark = pytest.mark.slow

REQUESTS = 2000
RATE = 200.0  # a second: ten seconds of load


async def publish_steadily(client: Client, ids: list[str], sent: list[str]) -> None:
    """Publish every id at RATE a second; a publish the broker could not take (it is
    restarting) is retried with the same id, which the server stores once."""
    start = time.monotonic()
    for i, request_id in enumerate(ids):
        await asyncio.sleep(max(0.0, start + i / RATE - time.monotonic()))
        while True:
            try:
                await client.publish(f"question {i}", f"session-{i % 50}", request_id=request_id)
                break
            except Exception:
                await asyncio.sleep(0.1)
        sent.append(request_id)


async def results_of(client: Client, wanted: set[str], idle: float = 5.0) -> dict[str, list]:
    """Every stored result, by request id (all copies), read until `wanted` are all there or
    nothing more came for `idle` seconds."""
    seen: dict[str, list] = {}
    stream = client.results()
    while not wanted <= seen.keys():
        try:
            result = await asyncio.wait_for(anext(stream), idle)
        except TimeoutError:
            break
        seen.setdefault(result.request_id, []).append(result)
    await stream.aclose()
    return seen


async def test_stages_and_the_broker_killed_in_turn_under_load(nats_server, mesh):
    env, procs = mesh(ORCH_INSTANCE="{host}-chaos", ORCH_PUBLISH_TIMEOUT="2")
    settings = settings_for(env)
    url = nats_server.url
    await wait_until_consuming(url, settings)
    client = await Client.connect(settings, url)
    ids = [new_request_id() for _ in range(REQUESTS)]
    sent: list[str] = []
    # Random order and moments, from a seed the figures print (CHAOS_SEED repeats a run).
    seed = int(os.environ.get("CHAOS_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    started = time.monotonic()
    try:
        load = asyncio.create_task(publish_steadily(client, ids, sent))
        for stage in rng.sample(STAGE_NAMES, len(STAGE_NAMES)):  # each once, in random order
            await asyncio.sleep(rng.uniform(0.3, 1.2))
            procs[stage].kill()
            await asyncio.sleep(rng.uniform(0.1, 1.0))  # down for a moment
            procs[stage].start()
        await asyncio.sleep(1.0)
        server = nats_server.process
        assert server is not None
        server.kill()  # SIGKILL: what the file store holds is what survives
        await asyncio.sleep(1.0)
        server.start()
        await load
        published = time.monotonic() - started
        status = await wait_quiet(url, settings)
        finished = time.monotonic() - started
        async with await Bus.connect(url, name="test-chaos") as bus:
            entries = [e async for e in DeadLetterQueue(bus, Topology(settings)).entries()]
        results = await results_of(client, set(ids) - {e.request_id for e in entries})
    finally:
        await client.close()
    rss = {stage: round(peak_rss_mb(p.proc.pid)) for stage, p in procs.items()}

    completed = set(results)
    dead = [e.request_id for e in entries]
    a = status.accounts
    # A result subject keeps its last message: a second result shows in the stored count.
    duplicates = a.completed - len(completed)
    both = completed & set(dead)
    lost = set(ids) - completed - set(dead)
    print(f"\nchaos (seed {seed}): {REQUESTS} requests at {RATE:g}/s, published in "
          f"{published:.1f}s, all "
          f"settled at {finished:.1f}s; every stage killed and restarted, then the server; "
          f"completed {len(completed)}, dead-lettered {len(dead)} "
          f"({sorted({e.reason for e in entries})}), in two places {len(both)}, lost "
          f"{len(lost)}, duplicates {duplicates}; status {a.accepted} accepted, "
          f"{'balanced' if a.balanced else 'NOT balanced'}; peak RSS MB {rss}")  # fmt: skip
    assert len(sent) == REQUESTS
    assert (len(both), len(lost), duplicates) == (0, 0, 0)
    assert dead == [], [(e.request_id, e.reason, e.stage, e.error) for e in entries]
    assert (a.accepted, a.completed, a.dead_lettered, a.in_flight) == (REQUESTS, REQUESTS, 0, 0)
    assert a.balanced


async def ask_times(client: Client, n: int) -> list[float]:
    """Seconds each of `n` requests asked one after another took to complete."""
    times = []
    for i in range(n):
        began = time.monotonic()
        await client.ask(f"probe {i}", f"probe-{i}", timeout=60)
        times.append(time.monotonic() - began)
    return sorted(times)


async def test_an_overload_soak_sheds_only_to_the_intake_and_the_dead_letter_stream(
    nats_server, mesh
):
    # A slow model (four calls at a time, a few ms a word) behind small channels: a few dozen
    # requests a second are sustainable; the soak offers ten times that for five seconds.
    slow = {"ORCH_STAGES__INFERENCE__OPTIONS__ECHO__TOKEN_DELAY": "0.002",
            "ORCH_STAGES__INFERENCE__CONCURRENCY": "4",
            "ORCH_STAGES__INFERENCE__MAX_ACK_PENDING": "8",
            "ORCH_STAGES__ASSEMBLE__SHED_AFTER": "1"}  # fmt: skip
    small = {f"ORCH_STAGES__{s.upper()}__CAPACITY": "100" for s in STAGE_NAMES}
    env, procs = mesh(**slow, **small)
    settings = settings_for(env)
    url = nats_server.url
    await wait_until_consuming(url, settings)
    client = await Client.connect(settings, url)
    try:
        before = await ask_times(client, 10)
        sustainable = 4 / before[len(before) // 2]
        offered, accepted, refused = 0, 0, 0
        soak_end = time.monotonic() + 5.0
        while time.monotonic() < soak_end:
            batch = max(1, int(sustainable))  # ten batches a second: ten times sustainable
            requests = [(f"soak {offered + j}", f"soak-{j % 30}") for j in range(batch)]
            taken, turned_away = await publish_all(client, requests)
            offered += batch
            accepted += len(taken)
            refused += turned_away
            await asyncio.sleep(0.1)
        status = await wait_quiet(url, settings, timeout=120)
        after = await ask_times(client, 10)
    finally:
        await client.close()
    async with await Bus.connect(url, name="test-soak") as bus:
        entries = [e async for e in DeadLetterQueue(bus, Topology(settings)).entries()]
    rss = {stage: round(peak_rss_mb(p.proc.pid)) for stage, p in procs.items()}
    a = status.accounts
    print(f"\nsoak: about {sustainable:.0f}/s sustainable, {offered} offered in 5 s; refused at "
          f"the intake {refused}, accepted {accepted}, completed {a.completed - 10}, shed "
          f"{len(entries)} ({sorted({e.reason for e in entries})}); latency p50 before "
          f"{before[5] * 1e3:.0f} ms, after {after[5] * 1e3:.0f} ms; peak RSS {rss}")  # fmt: skip
    assert offered == accepted + refused and refused > 0
    assert {e.reason for e in entries} <= {"backpressure"}
    assert (a.accepted, a.in_flight) == (accepted + 10, 0)  # and the 10 asked before
    assert a.completed + a.dead_lettered == a.accepted and a.balanced
    assert all(mb < 200 for mb in rss.values()), rss
