"""The demo: every stage in this process, ten requests through them, results and latencies."""

import asyncio
from typing import TextIO

from shared.app.latency import latency_table
from shared.cancel import cancel_and_wait
from shared.client import Client
from shared.errors import OrchestratorError
from shared.metrics import Metrics
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


async def run_demo(
    settings: Settings, url: str, requests: int, out: TextIO, *, wait: float = 10.0
) -> None:
    """Run the pipeline in-process against `url` and send `requests` requests through it.

    `wait` bounds how long the stages may take to start (a local model loads meanwhile) and
    how long each answer may take, times three.
    """
    topology = Topology(settings)
    metrics = Metrics()
    group = StageGroup(settings, topology.graph.names, topology, metrics)
    bus = await Bus.connect(
        url, name="orchestrator-demo", publish_timeout=settings.publish_timeout, wait=5.0
    )
    client = await Client.connect(settings, url)
    try:
        await declare(bus, topology)
        group.start(bus)
        work = asyncio.ensure_future(_ask(client, bus, topology, requests, out, wait))
        stages = asyncio.ensure_future(group.wait())
        await asyncio.wait({work, stages}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # a stage stopped (its set-up failed): say so now, not at timeout
            await cancel_and_wait([work])
            await stages  # re-raises the stage's error
            raise OrchestratorError("a stage stopped before the demo was done")
        stages.cancel()
        work.result()
        print("\nper-stage latency:\n" + latency_table(metrics, group), file=out)
    finally:
        await group.stop()
        await client.close()
        await bus.close()


async def _ask(
    client: Client, bus: Bus, topology: Topology, requests: int, out: TextIO, wait: float
) -> None:
    # Requests sent sooner wait in the intake until the stages are up, which is real but
    # not what the latency table is for; after `wait` they are sent anyway.
    await until_consuming(bus, topology, timeout=wait)
    asks = [QUESTIONS[i % len(QUESTIONS)] for i in range(requests)]
    results = await asyncio.gather(
        *(client.ask(text, session, timeout=3 * wait) for session, text in asks)
    )
    for (session, text), result in zip(asks, results, strict=True):
        ms = (result.completed_at - result.created_at) * 1000
        usage = result.usage
        model = f", {usage.model}: {usage.completion_tokens} tokens" if usage else ""
        answer = result.output.replace("\n", "\n     ")
        print(f"[{session}] {text}\n  -> {answer}\n  ({ms:.1f} ms{model})", file=out)
