"""The attempt log: what a removed consumer held un-acked is recorded, and nothing else."""

import asyncio

from shared.app.load import load
from shared.runtime.attempts import RECORD_TTL, AttemptLog, Prior
from shared.runtime.group import declare
from shared.topology import Topology
from shared.transport.api import MSG_ID
from shared.transport.connection import Bus
from tests.support import take


async def test_unsettled_messages_of_a_consumer_are_recorded_once(nats_server):
    settings = load(nats_url=nats_server.url)
    topology = Topology(settings)
    spec = topology.graph["post"]
    async with await Bus.connect(nats_server.url, name="t") as bus:
        await declare(bus, topology)
        # Partitions 0 and 1 belong to the consumer; partition 2 to nobody yet.
        for i in range(12):
            subject = topology.channel_subject(spec.channel, i % 3)
            await bus.publish(subject, b"{}", msg_id=f"m{i}")
        consumer = topology.consumer(spec, "dead", [0, 1])
        await bus.admin.ensure_consumer(consumer)
        puller = await bus.pull(consumer)
        got = await take(puller, 6)  # m0 m1 m3 m4 m6 m7: partition 2 is not its
        assert [d.headers[MSG_ID] for d in got] == ["m0", "m1", "m3", "m4", "m6", "m7"]
        await got[0].ack()
        await got[2].ack()
        await got[3].nak(delay=30)  # waiting for a retry is unsettled too
        await puller.close()

        log = AttemptLog(bus, topology, spec)
        await log.open()
        view = await bus.admin.consumer(consumer.stream, consumer.durable)
        assert view is not None
        # Its instance died: m1 m4 m6 m7 may have been under way; m9 m10 were never delivered.
        assert await log.record_unsettled(view, under_way=True) == 4
        assert await log.record_unsettled(view, under_way=True) == 0  # never counted twice
        await bus.admin.delete_consumer(consumer.stream, consumer.durable)

        await log.load()
        seqs = {d.headers[MSG_ID]: d.stream_seq for d in got}
        for name, seq in seqs.items():
            expected = Prior(0, 1) if name in ("m1", "m4", "m6", "m7") else None
            assert log.prior(seq, {MSG_ID: name}) == expected, name
        # A record applies only to the message it was made for, not to a new one at that seq.
        assert log.prior(seqs["m1"], {MSG_ID: "other"}) is None

        m1, m4 = (seqs["m1"], {MSG_ID: "m1"}), (seqs["m4"], {MSG_ID: "m4"})
        await log.started(*m1, Prior(0, 1), failures=0)  # under way: a loss if cut off
        await log.started(*m4, Prior(0, 1), failures=0)
        await log.failed(*m4, Prior(0, 1), failures=1)  # failed cleanly: no loss
        await log.load()
        assert log.prior(*m1) == Prior(0, 2)
        assert log.prior(*m4) == Prior(1, 1)
        await log.settled(seqs["m1"])
        await log.load()
        assert log.prior(*m1) is None
        assert log.prior(*m4) == Prior(1, 1)


async def test_a_stopping_instance_records_retries_as_failures_not_losses(nats_server):
    settings = load(nats_url=nats_server.url)
    topology = Topology(settings)
    spec = topology.graph["post"]
    async with await Bus.connect(nats_server.url, name="t") as bus:
        await declare(bus, topology)
        await bus.publish(topology.channel_subject(spec.channel, 0), b"{}", msg_id="m0")
        consumer = topology.consumer(spec, "leaving", [0])
        await bus.admin.ensure_consumer(consumer)
        puller = await bus.pull(consumer)
        [waiting] = await take(puller, 1)
        await waiting.nak(delay=30)
        await puller.close()
        log = AttemptLog(bus, topology, spec)
        await log.open()
        view = await bus.admin.consumer(consumer.stream, consumer.durable)
        assert view is not None
        assert await log.record_unsettled(view, under_way=False) == 1
        await log.load()
        assert log.prior(waiting.stream_seq, waiting.headers) == Prior(1, 0)


async def test_records_are_all_read_while_other_stages_write_theirs(nats_server):
    # Instances of other stages write and delete their records meanwhile. A listing that
    # missed a record would hand a message that killed its stage a fresh start.
    settings = load(nats_url=nats_server.url)
    topology = Topology(settings)
    spec = topology.graph["post"]
    async with (
        await Bus.connect(nats_server.url, name="t") as bus,
        await Bus.connect(nats_server.url, name="others") as others,
    ):
        await declare(bus, topology)
        log = AttemptLog(bus, topology, spec)
        await log.open()
        for seq in range(1, 26):
            await log.started(seq, {MSG_ID: f"m{seq}"}, Prior(0, 1), failures=0)
        theirs = await others.key_value(topology.bucket(topology.attempts_bucket(), RECORD_TTL))
        stop = asyncio.Event()

        async def churn(stage: str) -> None:
            n = 0
            while not stop.is_set():
                await theirs.put(f"{stage}.{n % 50}", b'{"id":"x","f":0,"l":1,"open":true}')
                await theirs.delete(f"{stage}.{(n + 25) % 50}")
                n += 1

        writers = [asyncio.create_task(churn(stage)) for stage in ("rag", "inference")]
        try:
            incomplete = 0
            for _ in range(200):
                await log.load()
                found = sum(log.prior(seq, {MSG_ID: f"m{seq}"}) == Prior(0, 2)
                            for seq in range(1, 26))  # fmt: skip
                incomplete += found != 25
        finally:
            stop.set()
            await asyncio.gather(*writers)
        assert incomplete == 0
