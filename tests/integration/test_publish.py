"""Publishing to JetStream: every way a publish ends, on a real server."""

import asyncio

import nats
import pytest

from shared.errors import BusError, MessageTooLarge, PublishTimeout
from shared.topology import StreamSpec
from shared.transport.connection import Bus


def stream(max_msgs: int = -1) -> StreamSpec:
    return StreamSpec(name="P", subjects=("p.>",), retention="limits", discard="new",
                      max_msgs=max_msgs, max_bytes=-1, max_age=0, max_msg_size=-1,
                      max_msgs_per_subject=-1, storage="memory", replicas=1,
                      duplicate_window=60)  # fmt: skip


async def test_acks_carry_the_stream_sequence_and_duplicates_are_dropped(nats_server):
    async with await Bus.connect(nats_server.url, name="t") as bus:
        await bus.admin.ensure_stream(stream(100))
        seqs = await asyncio.gather(*(bus.publish("p.x", b"m", msg_id=f"m{i}") for i in range(50)))
        assert sorted(seqs) == list(range(1, 51))
        assert await bus.publish("p.x", b"m", msg_id="m7") == seqs[7]  # the stored copy's
        assert (await bus.admin.stream_state("P")).last_seq == 50


async def test_a_subject_no_stream_stores_is_a_clear_error(nats_server):
    async with await Bus.connect(nats_server.url, name="t") as bus:
        with pytest.raises(BusError, match=r"no stream stores 'nowhere\.x'"):
            await bus.publish("nowhere.x", b"m", msg_id="a")


async def test_a_publish_nobody_acks_times_out(nats_server):
    # A plain subscriber takes the message and never answers, as a stalled server would.
    async def ignore(msg: nats.aio.msg.Msg) -> None:
        pass

    nc = await nats.connect(nats_server.url)
    await nc.subscribe("silent.x", cb=ignore)
    try:
        async with await Bus.connect(nats_server.url, name="t", publish_timeout=0.5) as bus:
            with pytest.raises(PublishTimeout, match=r"no ack for publish to silent\.x"):
                await bus.publish("silent.x", b"m", msg_id="a")
    finally:
        await nc.close()


async def test_a_message_over_max_payload_is_refused_before_it_is_sent(nats_server):
    async with await Bus.connect(nats_server.url, name="t") as bus:
        await bus.admin.ensure_stream(stream())
        with pytest.raises(MessageTooLarge):
            await bus.publish("p.x", b"x" * (2 * 1024 * 1024), msg_id="big")
        assert await bus.publish("p.x", b"small", msg_id="small") == 1  # still connected
