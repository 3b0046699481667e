"""The demo: every stage in this process, ten requests through them, results and latencies."""

import asyncio
from typing import TextIO

from shared.client import Client
from shared.latency import format_table, stage_latencies
from shared.runtime.group import StageGroup, declare
from shared.settings import Settings
from shared.status import until_consuming
from shared.topology import Topology
from shared.transport.connection import Bus

QUESTIONS = (
    ("alice", "What is JetStream and how does it store messages?"),
    ("bob", "How does backpressure work when a stream is full?"),
    ("carol", "Why use a dead-letter stream?"),
    ("alice", "What does max_ack_pending bound?"),
    ("bob", "How do pull consumers fetch messages?"),
    ("carol", "What is retrieval-augmented generation?"),
    ("alice", "What is session affinity good for?"),
    ("bob", "How do language models generate text?"),
    ("carol", "What happens to a message after a work-queue ack?"),
    ("alice", "What is NATS?"),
)


async def run_demo(settings: Settings, url: str, requests: int, out: TextIO) -> None:
    """Run the pipeline in-process against `url` and send `requests` requests through it."""
    topology = Topology(settings)
    group = StageGroup(settings, topology.graph.names, topology)
    bus = await Bus.connect(
        url, name="orchestrator-demo", publish_timeout=settings.publish_timeout, wait=5.0
    )
    client = await Client.connect(settings, url)
    try:
        await declare(bus, topology)
        group.start(bus)
        # Requests sent sooner wait in the intake until the stages are up, which is real but
        # not what the latency table is for; after 10 s they are sent anyway.
        await until_consuming(bus, topology, timeout=10.0)
        asks = [QUESTIONS[i % len(QUESTIONS)] for i in range(requests)]
        results = await asyncio.gather(
            *(client.ask(text, session, timeout=30.0) for session, text in asks)
        )
        for (session, text), result in zip(asks, results, strict=True):
            ms = (result.completed_at - result.created_at) * 1000
            print(f"[{session}] {text}\n  -> {result.output}\n  ({ms:.1f} ms)", file=out)
        rows, end_to_end = stage_latencies(results)
        print("\nper-stage latency:\n" + format_table(rows, end_to_end), file=out)
    finally:
        await group.stop()
        await client.close()
        await bus.close()
