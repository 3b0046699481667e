"""Declaring streams and consumers: idempotent, updates in place, clear errors otherwise."""

import pytest

from services.registry import STAGES
from shared.bus import Bus
from shared.client import Client
from shared.errors import Overloaded, SubjectTaken, TopologyError
from shared.runner import declare
from shared.settings import load_settings
from shared.topology import Topology


async def test_declare_is_idempotent_and_updates_changed_limits(nats_server):
    settings = load_settings(nats_url=nats_server.url)
    async with await Bus.connect(nats_server.url, name="t") as bus:
        first = await declare(bus, settings)
        assert all(line.endswith(": created") for line in first), first
        assert len(first) == 8  # five channels, results, dead letters, counters

        again = await declare(bus, settings)
        assert all(line.endswith(": unchanged") for line in again), again

        changed = settings.model_copy(deep=True)
        changed.channels.post.capacity = 10
        report = await declare(bus, changed)
        assert "stream ORCH_POST: updated (max_msgs: 1024 -> 10)" in report
        assert sum("updated" in line for line in report) == 1
        assert all(line.endswith(": unchanged") for line in await declare(bus, changed))


async def test_consumers_update_in_place_and_never_overlap(nats_server):
    settings = load_settings(nats_url=nats_server.url)
    topology = Topology(settings)
    async with await Bus.connect(nats_server.url, name="t") as bus:
        await declare(bus, settings)
        spec = topology.consumer(STAGES["post"], "a", [0, 1])
        assert await bus.ensure_consumer(spec) == "created"
        assert await bus.ensure_consumer(spec) == "unchanged"
        grown = topology.consumer(STAGES["post"], "a", [0, 1, 2])
        assert (await bus.ensure_consumer(grown)).startswith("updated (filter_subjects:")
        # A work-queue stream gives each subject to one consumer: a partition has one owner.
        with pytest.raises(SubjectTaken):
            await bus.ensure_consumer(topology.consumer(STAGES["post"], "b", [2, 3]))
        assert await bus.ensure_consumer(topology.consumer(STAGES["post"], "b", [3])) == "created"


async def test_declare_refuses_what_cannot_change_in_place(nats_server):
    settings = load_settings(nats_url=nats_server.url)
    async with await Bus.connect(nats_server.url, name="t") as bus:
        await declare(bus, settings)
        changed = settings.model_copy(deep=True)
        changed.storage = "memory"
        with pytest.raises(TopologyError, match=r"cannot update stream ORCH_INTAKE \(storage"):
            await declare(bus, changed)


async def test_full_intake_raises_overloaded_not_a_hang(nats_server):
    settings = load_settings(nats_url=nats_server.url)
    settings.channels.intake.capacity = 3
    async with await Bus.connect(nats_server.url, name="t") as bus:
        await declare(bus, settings)  # nobody consumes
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
