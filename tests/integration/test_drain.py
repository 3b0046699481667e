"""A drain that runs out of time cuts its handlers off and still hands its partitions over."""

import asyncio

from services.registry import PIPELINE, STAGES
from shared.attempts import AttemptLog
from shared.bus import Bus
from shared.client import Client
from shared.runner import StageGroup, declare
from shared.topology import Topology
from tests.support import settings_for, stage_env


async def test_a_drain_past_its_timeout_cancels_handlers_and_leaves(nats_server):
    env = stage_env(nats_server.url, ORCH_DRAIN_TIMEOUT="1",
                    ORCH_STAGES__INFERENCE__CONCURRENCY="1",
                    ORCH_WORKER__ECHO_TOKEN_DELAY="0.2")  # fmt: skip
    settings = settings_for(env)
    topology = Topology(settings)
    bus = await Bus.connect(nats_server.url, name="test-drain")
    client = await Client.connect(settings, nats_server.url)
    group = StageGroup(settings, bus, PIPELINE)
    try:
        await declare(bus, settings)
        group.start()
        await client.publish("a question the slow model will not finish in time", "s")
        inference = next(rt for rt in group.runtimes if rt.spec.name == "inference")
        async with asyncio.timeout(30):
            while not inference._inflight:
                await asyncio.sleep(0.05)
        [delivery] = list(inference._inflight)
        await group.stop()
        assert all(task.done() for task in group._tasks)
        assert not inference._inflight  # the handler was cancelled, not left running
        stream = topology.stream_name(STAGES["inference"].input)
        assert await bus.consumers(stream) == []  # partitions handed over
        log = AttemptLog(bus, settings, STAGES["inference"])
        await log.open()
        await log.load()
        prior = log.prior(delivery.stream_seq, delivery.headers)
        assert prior is not None and prior.losses == 1  # cut off, not failed
    finally:
        await client.close()
        await bus.close()
