"""Streams of the raw baseline: the same shape as the project's (five work queues + results)."""

import nats
from nats.js import api

HOPS = 5


def raw_consumer(hop: int) -> tuple[str, str]:
    """(stream, durable) that hop `hop` reads."""
    return f"RAW_H{hop}", f"h{hop}"


def raw_next_subject(hop: int, hops: int, rid: str, subject: str) -> str:
    """Where hop `hop` publishes: the next hop's stream on the same partition, or results."""
    if hop == hops:
        return f"raw.results.{rid}"
    return f"raw.h{hop + 1}.{subject.rsplit('.', 1)[1]}"


async def declare_raw(url: str, capacity: int, max_ack_pending: int, hops: int = HOPS) -> None:
    """Create the baseline's streams and consumers on a fresh server."""
    nc = await nats.connect(url)
    jsm = nc.jsm()
    for hop in range(1, hops + 1):
        stream, durable = raw_consumer(hop)
        await jsm.add_stream(
            api.StreamConfig(
                name=stream,
                subjects=[f"raw.h{hop}.*"],
                retention=api.RetentionPolicy.WORK_QUEUE,
                discard=api.DiscardPolicy.NEW,
                max_msgs=capacity,
                storage=api.StorageType.FILE,
                duplicate_window=120,
            )
        )
        await jsm.add_consumer(
            stream,
            api.ConsumerConfig(
                durable_name=durable,
                ack_policy=api.AckPolicy.EXPLICIT,
                max_ack_pending=max_ack_pending,
                filter_subject=f"raw.h{hop}.*",
            ),
        )
    await jsm.add_stream(
        api.StreamConfig(
            name="RAW_RESULTS",
            subjects=["raw.results.*"],
            storage=api.StorageType.FILE,
            max_msgs_per_subject=1,
            duplicate_window=120,
        )
    )
    await nc.close()
