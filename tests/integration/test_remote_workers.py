"""Remote workers: models served over NATS by `orchestrator worker serve` processes, in a
queue group. Two share the load; one killed mid-run loses nothing."""

import asyncio
import signal
import subprocess

import nats
import orjson
from nats.aio.msg import Msg

from shared.client import Client
from tests.support import (
    ROOT,
    STAGE_NAMES,
    StageProcess,
    collect,
    orchestrator_command,
    settings_for,
    stage_env,
    wait_until_consuming,
)

PIPELINE = """
[stages.inference]
backoff = [0.1]

[stages.inference.options]
worker = "remote"
remote = { model = "echo", idle_timeout = 1.5, first_token_timeout = 10 }

[stages.inference.options.models.echo]
worker = "echo"
echo = { token_delay = 0.005 }
"""


async def micro(url: str, verb: str) -> list[dict]:
    """Every answer to `$SRV.<verb>.orchestrator-worker` within half a second."""
    nc = await nats.connect(url)
    try:
        inbox, answers = nc.new_inbox(), []

        async def answer(msg: Msg) -> None:
            answers.append(orjson.loads(msg.data))

        sub = await nc.subscribe(inbox, cb=answer)
        await nc.publish(f"$SRV.{verb}.orchestrator-worker", b"", reply=inbox)
        await asyncio.sleep(0.5)
        await sub.unsubscribe()
        return answers
    finally:
        await nc.close()


async def test_two_workers_share_the_load_and_a_killed_one_loses_nothing(nats_server, tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text(PIPELINE, encoding="utf-8")
    env = stage_env(nats_server.url, ORCH_CONFIG=str(config))
    settings = settings_for(env)

    def worker(n: int) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"worker-{n}.log", "wb")  # noqa: SIM115
        cmd = [*orchestrator_command(), "worker", "serve", "--model", "echo"]
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    workers = [worker(1), worker(2)]
    stages = [StageProcess(name, env, tmp_path) for name in STAGE_NAMES]
    try:
        await wait_until_consuming(nats_server.url, settings)
        async with asyncio.timeout(30):
            while len(await micro(nats_server.url, "PING")) < 2:
                await asyncio.sleep(0.2)
        client = await Client.connect(settings, nats_server.url)
        try:
            ids = [await client.publish(f"question {i}: what is a queue group?", f"s{i % 7}")
                   for i in range(40)]  # fmt: skip
            seen = 0
            async with asyncio.timeout(60):
                async for _ in client.results():
                    seen += 1
                    if seen == 8:
                        break
            stats = await micro(nats_server.url, "STATS")
            workers[0].kill()  # mid-run: it holds requests under way
            workers[0].wait()
            results = await collect(client, set(ids), timeout=90)
        finally:
            await client.close()
    finally:
        for p in stages:
            p.signal(signal.SIGTERM)
        codes = [p.stop() for p in stages]
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        worker_codes = [w.wait(30) for w in workers]
    assert codes == [0] * len(stages)
    assert worker_codes[1] == 0  # the survivor drained and stopped cleanly
    served = [s["endpoints"][0]["num_requests"] for s in stats]
    assert len(served) == 2 and all(n > 0 for n in served), served  # both had work
    assert set(results) == set(ids)
    assert all(len(copies) == 1 for copies in results.values())  # exactly once
    for copies in results.values():
        [result] = copies
        assert result.output.endswith("Answer:") and result.usage is not None
        assert result.usage.model == "echo"
