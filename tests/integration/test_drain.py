"""A drain that runs out of time cuts its handlers off and still hands its partitions over."""

import asyncio
import signal
import subprocess

from shared.runtime.attempts import AttemptLog
from shared.topology import Topology
from tests.support import (
    ROOT,
    busy_runtime,
    in_process_pipeline,
    orchestrator_command,
    settings_for,
    stage_env,
    wait_until_consuming,
)


async def test_a_drain_past_its_timeout_cancels_handlers_and_leaves(nats_server):
    slow = {"ORCH_DRAIN_TIMEOUT": "1", "ORCH_STAGES__INFERENCE__CONCURRENCY": "1",
            "ORCH_STAGES__INFERENCE__OPTIONS__ECHO__TOKEN_DELAY": "0.2"}  # fmt: skip
    async with in_process_pipeline(nats_server.url, **slow) as (settings, bus, client, group):
        await client.publish("a question the slow model will not finish in time", "s")
        inference = await busy_runtime(group, "inference")
        [delivery] = inference.deliveries()
        await group.stop()
        assert not group.running
        assert inference.in_flight == 0  # the handler was cancelled, not left running
        topology = Topology(settings)
        stream = topology.stream_name(inference.stage.channel)
        assert await bus.admin.consumers(stream) == []  # partitions handed over
        log = AttemptLog(bus, topology, inference.stage)
        await log.open()
        await log.load()
        prior = log.prior(delivery.stream_seq, delivery.headers)
        assert prior is not None and prior.losses == 1  # cut off, not failed


async def test_stopping_after_the_server_went_away_ends_cleanly(nats_binary, tmp_path):
    # The connection is reconnecting with writes buffered when the stop comes: closing it
    # must not try to send them to the socket that is gone.
    env = stage_env(nats_binary.url)
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        up = subprocess.Popen([*orchestrator_command(), "up"], cwd=ROOT, env=env, stdout=out,
                              stderr=subprocess.STDOUT)  # fmt: skip
    try:
        await wait_until_consuming(nats_binary.url, settings_for(env))
        nats_binary.stop()
        await asyncio.sleep(1.5)  # heartbeats and pulls buffered meanwhile
        up.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(up.wait, 60)
    finally:
        if up.poll() is None:
            up.kill()
    said = log.read_text()
    assert "Traceback" not in said, said[-3000:]
    assert code == 0, said[-3000:]
    # Nothing to hand over to: the stages leave at once instead of waiting out each call.
    assert said.count("the server is unreachable; the other instances take the partitions "
                      "over after failover_after") == 5, said[-3000:]  # fmt: skip
