"""A drain that runs out of time cuts its handlers off and still hands its partitions over."""

from shared.runtime.attempts import AttemptLog
from shared.topology import Topology
from tests.support import busy_runtime, in_process_pipeline


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
