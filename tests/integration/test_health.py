"""A stage whose every slot is busy with a slow handler is alive, not hung."""

import asyncio

from services.registry import PIPELINE
from shared.bus import Bus
from shared.client import Client
from shared.runner import StageGroup, declare
from tests.support import settings_for, stage_env


async def test_the_loop_keeps_turning_while_slow_handlers_hold_every_slot(nats_server):
    # One slot for inference, and each call takes seconds: a local model on a small machine.
    env = stage_env(nats_server.url, ORCH_STAGES__INFERENCE__CONCURRENCY="1",
                    ORCH_WORKER__ECHO_TOKEN_DELAY="0.1")  # fmt: skip
    settings = settings_for(env)
    bus = await Bus.connect(nats_server.url, name="test-health")
    client = await Client.connect(settings, nats_server.url)
    group = StageGroup(settings, bus, PIPELINE)
    try:
        await declare(bus, settings)
        group.start()
        rid = await client.publish("what keeps a stage alive while its model is slow?", "s")
        await client.publish("and a second request behind it?", "s")
        inference = next(rt for rt in group.runtimes if rt.spec.name == "inference")
        async with asyncio.timeout(30):
            while not inference._inflight:
                await asyncio.sleep(0.05)
        for _ in range(30):  # three seconds with the only slot taken
            assert inference._inflight, "the slow call ended too soon for this test"
            assert group.healthy(stale_after=2.0)
            await asyncio.sleep(0.1)
        result = await client.result(rid, timeout=60)
        assert result.output.endswith("Answer:")
    finally:
        await group.stop()
        await client.close()
        await bus.close()
