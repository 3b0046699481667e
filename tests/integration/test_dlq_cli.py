"""The operator's view: status and dlq ls/show/replay/purge from the command line."""

import json
import signal
import subprocess

import pytest

from shared.client import Client
from tests.support import ROOT, orchestrator_command, settings_for, stage_env, wait_quiet


def run(args, env):
    command = [*orchestrator_command(), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip


@pytest.fixture
def pipeline(nats_server, tmp_path):
    """`orchestrator up` with a poisoned worker (3 attempts, fast retries)."""
    env = stage_env(
        nats_server.url,
        ORCH_WORKER__KIND="tests.workers:poison",
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
    assert run(["dlq", "show", "99999"], env).returncode == 1

    dry = run(["dlq", "replay", "--dry-run", "--session", "sess 0"], env)
    assert dry.stdout.strip() == "would replay 1 entries"

    refused = run(["dlq", "purge", "--session", "sess 2"], env)
    assert refused.returncode == 2
    assert "refusing to purge 1 entries without --yes" in refused.stderr
    purged = run(["dlq", "purge", "--session", "sess 2", "--yes"], env)
    assert purged.stdout.strip() == "purged 1 entries"

    after = json.loads(run(["status", "--json"], env).stdout)["accounts"]
    assert (after["dead_letters_now"], after["purged"], after["dead_lettered"]) == (2, 1, 3)
    assert after["balanced"] is True
