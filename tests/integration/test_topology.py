"""Declaring streams and consumers: idempotent, updates in place, clear errors otherwise."""

import pytest

from shared.app.load import load
from shared.client import Client
from shared.errors import Overloaded, SubjectTaken, TopologyError
from shared.runtime.group import declare
from shared.topology import Topology
from shared.transport.connection import Bus


async def test_declare_is_idempotent_and_updates_changed_limits(nats_server):
    settings = load(nats_url=nats_server.url)
    async with await Bus.connect(nats_server.url, name="t") as bus:
        first = await declare(bus, Topology(settings))
        assert all(line.endswith(": created") for line in first), first
        assert len(first) == 9  # five channels, results, tokens, dead letters, counters

        again = await declare(bus, Topology(settings))
        assert all(line.endswith(": unchanged") for line in again), again

        changed = settings.model_copy(deep=True)
        changed.stages["post"].capacity = 10
        report = await declare(bus, Topology(changed))
        assert "stream ORCH_POST: updated (max_msgs: 1024 -> 10)" in report
        assert sum("updated" in line for line in report) == 1
        assert all(line.endswith(": unchanged") for line in await declare(bus, Topology(changed)))


async def test_consumers_update_in_place_and_never_overlap(nats_server):
    settings = load(nats_url=nats_server.url)
    topology = Topology(settings)
    async with await Bus.connect(nats_server.url, name="t") as bus:
        await declare(bus, Topology(settings))
        spec = topology.consumer(topology.graph["post"], "a", [0, 1])
        assert await bus.admin.ensure_consumer(spec) == "created"
        assert await bus.admin.ensure_consumer(spec) == "unchanged"
        grown = topology.consumer(topology.graph["post"], "a", [0, 1, 2])
        assert (await bus.admin.ensure_consumer(grown)).startswith("updated (filter_subjects:")
        # A work-queue stream gives each subject to one consumer: a partition has one owner.
        with pytest.raises(SubjectTaken):
            await bus.admin.ensure_consumer(topology.consumer(topology.graph["post"], "b", [2, 3]))
        assert (
            await bus.admin.ensure_consumer(topology.consumer(topology.graph["post"], "b", [3]))
            == "created"
        )


async def test_declare_refuses_what_cannot_change_in_place(nats_server):
    settings = load(nats_url=nats_server.url)
    async with await Bus.connect(nats_server.url, name="t") as bus:
        await declare(bus, Topology(settings))
        changed = settings.model_copy(deep=True)
        changed.storage = "memory"
        with pytest.raises(TopologyError, match=r"cannot update stream ORCH_INTAKE \(storage"):
            await declare(bus, Topology(changed))


async def test_full_intake_raises_overloaded_not_a_hang(nats_server):
    settings = load(nats_url=nats_server.url)
    settings.stages["rag"].capacity = 3
    async with await Bus.connect(nats_server.url, name="t") as bus:
        await declare(bus, Topology(settings))  # nobody consumes
    client = await Client.connect(settings, nats_server.url)
    try:
        await client.publish("q0", "s")
        await client.publish("q1", "s")
        # The same request id twice within the duplicate window is stored once.
        assert await client.publish("dup", "s", request_id="fixed") == "fixed"
        assert await client.publish("dup", "s", request_id="fixed") == "fixed"
        async with await Bus.connect(nats_server.url, name="t") as bus:
            assert (await bus.admin.stream_state("ORCH_INTAKE")).messages == 3
        with pytest.raises(Overloaded, match=r"orch\.intake"):
            await client.publish("one too many", "s")
    finally:
        await client.close()
