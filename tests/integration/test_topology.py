"""Declaring streams and consumers: idempotent, updates in place, clear errors otherwise."""

import pytest

from services.registry import PIPELINE
from shared.bus import Bus
from shared.client import Client
from shared.errors import Overloaded, TopologyError
from shared.runner import declare
from shared.settings import load_settings


async def test_declare_is_idempotent_and_updates_changed_limits(nats_server):
    settings = load_settings(nats_url=nats_server.url)
    async with await Bus.connect(nats_server.url, name="t") as bus:
        first = await declare(bus, settings, PIPELINE)
        assert all(line.endswith(": created") for line in first), first
        # five channels, results, dead letters, counters; five consumers
        assert len(first) == 8 + 5

        again = await declare(bus, settings, PIPELINE)
        assert all(line.endswith(": unchanged") for line in again), again

        changed = settings.model_copy(deep=True)
        changed.channels.post.capacity = 10
        changed.stages.inference.max_ack_pending = 7
        report = await declare(bus, changed, PIPELINE)
        assert "stream ORCH_POST: updated (max_msgs: 1024 -> 10)" in report
        assert "consumer ORCH_INFERENCE/inference: updated (max_ack_pending: 512 -> 7)" in report
        assert sum("updated" in line for line in report) == 2
        assert all(line.endswith(": unchanged") for line in await declare(bus, changed, PIPELINE))


async def test_declare_refuses_what_cannot_change_in_place(nats_server):
    settings = load_settings(nats_url=nats_server.url)
    async with await Bus.connect(nats_server.url, name="t") as bus:
        await declare(bus, settings, PIPELINE)
        changed = settings.model_copy(deep=True)
        changed.storage = "memory"
        with pytest.raises(TopologyError, match=r"cannot update stream ORCH_INTAKE \(storage"):
            await declare(bus, changed, PIPELINE)


async def test_full_intake_raises_overloaded_not_a_hang(nats_server):
    settings = load_settings(nats_url=nats_server.url)
    settings.channels.intake.capacity = 3
    async with await Bus.connect(nats_server.url, name="t") as bus:
        await declare(bus, settings, PIPELINE[:0])  # streams only: nobody consumes
    client = await Client.connect(settings, nats_server.url)
    try:
        await client.publish("q0", "s")
        await client.publish("q1", "s")
        # The same request id twice within the duplicate window is stored once.
        assert await client.publish("dup", "s", request_id="fixed") == "fixed"
        assert await client.publish("dup", "s", request_id="fixed") == "fixed"
        async with await Bus.connect(nats_server.url, name="t") as bus:
            assert (await bus.stream_state("ORCH_INTAKE")).messages == 3
        with pytest.raises(Overloaded, match=r"orch\.intake"):
            await client.publish("one too many", "s")
    finally:
        await client.close()
