"""The operator's view: status and dlq ls/show/replay/purge from the command line."""

import json
import signal
import subprocess
import time

import nats
import pytest

from shared.client import Client
from shared.dlq import DeadLetterQueue, EntryFilter
from shared.topology import Topology
from shared.transport.connection import Bus
from tests.support import ROOT, orchestrator_command, settings_for, stage_env, wait_quiet


def run(args, env, timeout=120):
    command = [*orchestrator_command(), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip


@pytest.fixture
def pipeline(nats_server, tmp_path):
    """`orchestrator up` with a poisoned worker (3 attempts, fast retries)."""
    env = stage_env(
        nats_server.url,
        ORCH_STAGES__INFERENCE__OPTIONS__WORKER="tests.workers:poison",
        ORCH_STAGES__INFERENCE__MAX_DELIVER="3",
        ORCH_STAGES__INFERENCE__BACKOFF="[0.05]",
    )
    assert run(["declare"], env).returncode == 0
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen([*orchestrator_command(), "up"], cwd=ROOT, env=env, stdout=log,
                          stderr=subprocess.STDOUT)  # fmt: skip
    yield env
    up.send_signal(signal.SIGTERM)
    assert up.wait(60) == 0
    log.close()


async def test_status_and_dlq_commands(nats_server, pipeline):
    env = pipeline
    settings = settings_for(env)
    client = await Client.connect(settings, nats_server.url)
    try:
        good = await client.publish("healthy request", "alice")
        again = await client.publish("healthy request", "alice", request_id=good)
        bad = [await client.publish(f"poison {i}", f"sess {i}") for i in range(3)]
        await client.result(good, timeout=30)
    finally:
        await client.close()
    assert again == good
    await wait_quiet(nats_server.url, settings)

    status = run(["status", "--json"], env)
    assert status.returncode == 0, status.stderr
    accounts = json.loads(status.stdout)["accounts"]
    # The duplicate publish of `good` was accepted once and answered once.
    assert (accounts["accepted"], accounts["completed"], accounts["dead_lettered"]) == (4, 1, 3)
    assert accounts["balanced"] is True
    text = run(["status"], env).stdout
    assert "accepted 4 = completed 1 + dead-lettered 3 + in flight 0   [balanced]" in text
    assert "failed=3" in text

    listed = run(["dlq", "ls", "--json"], env)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(r["request_id"] for r in rows) == sorted(bad)
    assert {(r["stage"], r["reason"], r["delivered"]) for r in rows} == {("inference", "failed", 3)}
    table = run(["dlq", "ls", "--session", "sess 1"], env)
    assert bad[1] in table.stdout
    assert "1 entries" in table.stderr
    assert run(["dlq", "ls", "--reason", "expired", "--json"], env).stdout == ""

    shown = json.loads(run(["dlq", "show", str(rows[0]["seq"]), "--json"], env).stdout)
    assert shown["payload"]["input"].startswith("poison")
    assert shown["headers"]["Orch-Error"] == "RuntimeError: poisoned input"
    # "Not found" is exit 1 with one line on stderr, as for `orchestrator result`.
    for args, line in (
        (["dlq", "show", "99999"], "no dead-letter entry #99999"),
        (["result", "no-such-request"], "no result for request no-such-request"),
    ):
        missing = run(args, env)
        assert (missing.returncode, missing.stdout, missing.stderr) == (1, "", line + "\n"), args

    for args in (
        ["dlq", "show", "0"],
        ["dlq", "ls", "--limit", "0"],
        ["dlq", "replay", "--rate", "-1"],
    ):
        refused = run(args, env)  # a meaningless number is a usage error
        assert refused.returncode == 2 and "must be" in refused.stderr, args

    dry = run(["dlq", "replay", "--dry-run", "--session", "sess 0"], env)
    assert dry.stdout.strip() == "would replay 1 of 1 entries"

    refused = run(["dlq", "purge", "--session", "sess 2"], env)
    assert refused.returncode == 2
    assert "refusing to purge 1 entries without --yes" in refused.stderr
    purged = run(["dlq", "purge", "--session", "sess 2", "--yes"], env)
    assert purged.stdout.strip() == "purged 1 entries"

    after = json.loads(run(["status", "--json"], env).stdout)["accounts"]
    assert (after["dead_letters_now"], after["purged"], after["dead_lettered"]) == (2, 1, 3)
    assert after["balanced"] is True

    # A message published straight to an inner stage subject is dead-lettered, never accepted.
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().publish(Topology(settings).channel_subject("post", 0), b"raw")
    finally:
        await nc.close()
    await wait_quiet(nats_server.url, settings)
    raw = json.loads(run(["status", "--json"], env).stdout)["accounts"]
    assert (raw["accepted"], raw["dead_lettered"], raw["surplus"], raw["balanced"]) == (
        4, 4, 1, False)  # fmt: skip
    text = run(["status"], env).stdout.splitlines()
    assert text[0].endswith("[NOT balanced: 1 more than accepted]")
    assert text[1] == ("  (messages published straight to stage subjects, not through the intake,"
                       " are not counted as accepted)")  # fmt: skip


async def dead_letters(url, settings):
    async with await Bus.connect(url, name="test-dlq") as bus:
        return [e async for e in DeadLetterQueue(bus, Topology(settings)).entries()]


async def test_replay_of_entries_that_fail_again_replays_each_once(nats_server, pipeline):
    # Replaying these dead-letters them again at once: expired requests expire again, invalid
    # payloads are invalid again. A replay must not pick up its own new entries.
    env = pipeline
    settings = settings_for(env)
    topology = Topology(settings)
    client = await Client.connect(settings, nats_server.url)
    try:
        late = {await client.publish(f"late {i}", f"s{i}", deadline=time.time() - 60)
                for i in range(2)}  # fmt: skip
    finally:
        await client.close()
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        garbage = {b"not json at all", b'{"v": 1, "input": 7}'}
        for i, payload in enumerate(sorted(garbage)):
            await js.publish(topology.channel_subject("inference", i), payload)
    finally:
        await nc.close()
    await wait_quiet(nats_server.url, settings)
    before = await dead_letters(nats_server.url, settings)
    assert sorted(e.reason for e in before) == ["expired", "expired", "invalid", "invalid"]
    last = max(e.seq for e in before)

    # The command line, rate-limited so that re-dead-lettered entries land during the run.
    done = run(["dlq", "replay", "--reason", "invalid", "--rate", "10"], env, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "replayed 2 of 2 entries"

    # The Python API, the same way.
    ticks: list[tuple[int, int]] = []
    async with await Bus.connect(nats_server.url, name="test-replay") as bus:
        report = await DeadLetterQueue(bus, Topology(settings)).replay(
            EntryFilter(reason="expired"), rate=10, progress=lambda d, t: ticks.append((d, t))
        )
    assert (report.matched, report.replayed, report.failed) == (2, 2, [])
    assert ticks == [(1, 2), (2, 2)]

    status = await wait_quiet(nats_server.url, settings)
    after = await dead_letters(nats_server.url, settings)
    # Exactly the re-dead-lettered entries are left, each under a new sequence.
    assert all(e.seq > last for e in after)
    assert sorted(e.payload for e in after if e.reason == "invalid") == sorted(garbage)
    assert {e.request_id for e in after if e.reason == "expired"} == late
    assert len(after) == 4
    assert status.accounts.replayed == 4
