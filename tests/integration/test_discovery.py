"""Every stage instance answers the NATS micro protocol, as `nats micro` expects."""

import asyncio
import json
from typing import Any

import nats

from shared.client import Client
from tests.support import STAGE_NAMES, StageProcess, settings_for, stage_env, wait_until_consuming


async def gather_replies(
    nc: nats.NATS, subject: str, expect: int, quiet: float = 1.0, tries: int = 5
) -> list[dict[str, Any]]:
    """The replies to a request on `subject`, one per responder (by id and instance), asked
    again, up to `tries` times, until `expect` responders have answered.

    Asked again because the server now and then delivers none of another connection's
    first messages to a subscription just made (seen here with plain nats-py, once in a
    few thousand), as `nats micro ping` users simply ping again."""
    inbox = nc.new_inbox()
    replies: dict[tuple[str, str], dict[str, Any]] = {}

    async def keep(msg: Any) -> None:
        reply = json.loads(msg.data)
        replies[reply["id"], reply.get("metadata", {}).get("instance", "")] = reply

    sub = await nc.subscribe(inbox, cb=keep)
    for _ in range(tries):
        await nc.publish(subject, b"", reply=inbox)
        await asyncio.sleep(quiet)
        if len(replies) >= expect:
            break
    await sub.unsubscribe()
    return list(replies.values())


async def test_every_stage_instance_answers_ping_info_and_stats(nats_server, tmp_path):
    procs = [StageProcess(s, stage_env(nats_server.url), tmp_path) for s in STAGE_NAMES]
    twin = stage_env(nats_server.url, ORCH_INSTANCE="second")
    procs.append(StageProcess("inference", twin, tmp_path, name="inference-second"))
    try:
        settings = settings_for(twin)
        await wait_until_consuming(nats_server.url, settings)
        n = 16
        async with await Client.connect(settings, nats_server.url) as client:
            ids = [await client.publish(f"question {i}", f"disc-{i}") for i in range(n)]
            for rid in ids:
                await client.result(rid, timeout=60)

        nc = await nats.connect(nats_server.url)  # a plain client: no project code
        try:
            pings = await gather_replies(nc, "$SRV.PING", len(procs))
            infos = await gather_replies(nc, "$SRV.INFO.orchestrator-stage", len(procs))
            stats = await gather_replies(nc, "$SRV.STATS.orchestrator-stage", len(procs))
            answer = await nc.request(f"orch.stages.status.{stats[0]['metadata']['instance']}",
                                      b"", timeout=5)  # fmt: skip
        finally:
            await nc.close()

        stages = sorted(p["metadata"]["stage"] for p in pings if p["name"] == "orchestrator-stage")
        assert stages == sorted([*STAGE_NAMES, "inference"]), pings
        assert all(p["type"] == "io.nats.micro.v1.ping_response" for p in pings)
        assert len({p["id"] for p in pings}) == len(pings)
        assert len(infos) == len(stages)
        for info in infos:
            assert info["version"] == "0.1.0"
            (endpoint,) = info["endpoints"]
            assert endpoint["name"] == "status"
            assert endpoint["subject"] == f"orch.stages.status.{info['metadata']['instance']}"

        by_stage: dict[str, list[dict[str, Any]]] = {}
        for s in stats:
            assert s["type"] == "io.nats.micro.v1.stats_response"
            data = s["endpoints"][0]["data"]
            assert data["instance"] == s["metadata"]["instance"]
            by_stage.setdefault(data["stage"], []).append(data)
        for stage in STAGE_NAMES:
            reports = by_stage[stage]
            # Each instance names the partitions it owns; together they own all 8, once.
            owned = sorted(p for r in reports for p in r["partitions"])
            assert owned == list(range(8)), (stage, owned)
            assert sum(r["messages"]["forwarded"] for r in reports) == n, (stage, reports)
            assert sum(r["handler_duration_seconds"]["count"] for r in reports) == n
            assert all(r["ready"] for r in reports)
        assert len(by_stage["inference"]) == 2
        assert by_stage["stream"][0]["request_duration_seconds"]["count"] == n
        assert "request_duration_seconds" not in by_stage["rag"][0]
        direct = json.loads(answer.data)
        assert direct["instance"] == stats[0]["metadata"]["instance"]
        assert "messages" in direct
    finally:
        for p in procs:
            p.stop()
