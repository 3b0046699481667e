"""A stage whose every slot is busy with a slow handler is alive, not hung."""

import asyncio

from tests.support import busy_runtime, in_process_pipeline


async def test_the_loop_keeps_turning_while_slow_handlers_hold_every_slot(nats_server):
    # One slot for inference, and each call takes seconds: a local model on a small machine.
    slow = {
        "ORCH_STAGES__INFERENCE__CONCURRENCY": "1",
        "ORCH_STAGES__INFERENCE__OPTIONS__ECHO__TOKEN_DELAY": "0.1",
    }
    async with in_process_pipeline(nats_server.url, **slow) as (_, _, client, group):
        rid = await client.publish("what keeps a stage alive while its model is slow?", "s")
        await client.publish("and a second request behind it?", "s")
        inference = await busy_runtime(group, "inference")
        for _ in range(30):  # three seconds with the only slot taken
            assert inference.in_flight, "the slow call ended too soon for this test"
            assert group.healthy(stale_after=2.0)
            await asyncio.sleep(0.1)
        result = await client.result(rid, timeout=60)
        assert result.output.endswith("Answer:")
