"""A pipeline file of one's own: a sixth stage, a branch and a middleware, as separate
processes on a real nats-server (docs/examples/moderated)."""

import asyncio
import json
import signal

from shared.client import Client
from shared.dlq import DeadLetterQueue
from shared.topology import Topology
from shared.transport.connection import Bus
from tests.support import (
    ROOT,
    StageProcess,
    collect,
    settings_for,
    stage_env,
    wait_quiet,
    wait_until_consuming,
)

EXAMPLE = ROOT / "docs" / "examples" / "moderated" / "pipeline.toml"
PLAIN = ["rag", "assemble", "inference", "post", "moderate", "stream"]
BRANCH = ["rag", "assemble", "inference", "translate", "post", "moderate", "stream"]


async def test_extra_stage_branch_and_middleware_from_the_pipeline_file(nats_server, tmp_path):
    audit = tmp_path / "audit.jsonl"
    middleware = [{"factory": "moderation:audit", "options": {"path": str(audit)}}]
    env = stage_env(
        nats_server.url, ORCH_CONFIG=str(EXAMPLE), ORCH_MIDDLEWARE=json.dumps(middleware)
    )
    settings = settings_for(env)
    topology = Topology(settings)
    assert set(topology.graph.names) == set(BRANCH)
    procs = [StageProcess(name, env, tmp_path) for name in topology.graph.names]
    try:
        await wait_until_consuming(nats_server.url, settings)
        client = await Client.connect(settings, nats_server.url)
        try:
            plain = [await client.publish(f"What is stream {i}?", f"s{i}") for i in range(6)]
            tagged = [
                await client.publish(
                    f"What is consumer {i}?", f"t{i}", metadata={"task": "translate"}
                )
                for i in range(6)
            ]
            banned = [
                await client.publish("Why is this darn stream full?", "b0"),
                await client.publish(
                    "Darn, what is a DARN ack?", "b1", metadata={"task": "translate"}
                ),
            ]
            seen = await collect(client, set(plain + tagged), timeout=60)
        finally:
            await client.close()
        status = await wait_quiet(nats_server.url, settings)
        async with await Bus.connect(nats_server.url, name="test-graph") as bus:
            entries = [e async for e in DeadLetterQueue(bus, topology).entries()]
    finally:
        for p in procs:
            p.signal(signal.SIGTERM)
        codes = {p.stage: p.stop() for p in procs}
    assert all(code == 0 for code in codes.values()), codes

    for rid in plain:
        [result] = seen[rid]
        assert [hop.stage for hop in result.hops] == PLAIN
        assert "Question: What is stream" in result.output
    for rid in tagged:
        [result] = seen[rid]
        assert [hop.stage for hop in result.hops] == BRANCH
        assert "demande: quoi est consumer" in result.output  # the glossary translated it
    assert not set(seen) & set(banned)
    assert sorted(e.request_id for e in entries) == sorted(banned)
    for entry in entries:
        assert (entry.stage, entry.reason) == ("moderate", "failed")
        assert "moderated: the answer contains darn" in entry.error
    assert status.accounts.balanced
    assert (status.accounts.completed, status.accounts.dead_lettered) == (12, 2)

    # The middleware saw every call of every stage on each request's path, and its outcome;
    # each stage process opened the audit file when it started and closed it after its drain.
    lines = [json.loads(line) for line in audit.read_text(encoding="utf-8").splitlines()]
    calls = {(x["stage"], x["request_id"]) for x in lines if x["event"] == "call"}
    paths = {rid: PLAIN for rid in plain} | {rid: BRANCH for rid in tagged}
    paths |= {banned[0]: PLAIN[:-1], banned[1]: BRANCH[:-1]}  # moderated: no stream
    assert calls == {(stage, rid) for rid, path in paths.items() for stage in path}
    outcomes = {(x["stage"], x["request_id"]): x for x in lines if x["event"] != "call"
                and x["event"] not in ("opened", "closed")}  # fmt: skip
    assert set(outcomes) == calls
    assert outcomes[("inference", tagged[0])]["to"] == "translate"
    assert outcomes[("inference", plain[0])]["to"] == "post"
    assert outcomes[("stream", plain[0])] | {"at": 0, "seconds": 0} == {
        "at": 0, "event": "forwarded", "stage": "stream", "to": None, "reason": None,
        "request_id": plain[0], "seconds": 0}  # fmt: skip
    assert outcomes[("moderate", banned[0])]["event"] == "dead_lettered"
    assert outcomes[("moderate", banned[0])]["reason"] == "failed"
    opened = sorted(x["stage"] for x in lines if x["event"] == "opened")
    closed = sorted(x["stage"] for x in lines if x["event"] == "closed")
    assert opened == closed == sorted(BRANCH)
    last = {x["stage"]: x["event"] for x in lines}  # each stage's last line: its teardown
    assert set(last.values()) == {"closed"}


async def test_validate_accepts_the_example_and_shows_its_graph():
    process = await asyncio.create_subprocess_exec(
        *__import__("tests.support", fromlist=["x"]).orchestrator_command(),
        "validate",
        str(EXAMPLE),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    text = out.decode()
    assert "valid; entry 'rag', 7 stages" in text
    assert "inference -[metadata.task=translate]-> translate" in text
    assert "post -> moderate" in text
