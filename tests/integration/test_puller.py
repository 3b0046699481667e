"""The continuous pull: bounded credit, requests that wait on the server, and their end."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared.app.load import load
from shared.errors import BusError
from shared.runtime.group import declare
from shared.topology import Topology
from shared.transport.api import ConsumerState, Delivery, Puller
from shared.transport.connection import Bus
from shared.transport.pull import REQUEST_EXPIRES, REQUEST_GRACE
from tests.support import CuttableProxy, take


@contextlib.asynccontextmanager
async def post_consumer(url: str, messages: int) -> AsyncIterator[tuple[Bus, Topology, Any]]:
    """A connected bus, the topology, and a consumer of the post stage's partition 0 with
    `messages` stored for it; the bus is closed afterwards."""
    settings = load(nats_url=url)
    topology = Topology(settings)
    async with await Bus.connect(url, name="t") as bus:
        await declare(bus, Topology(settings))
        spec = topology.graph["post"]
        for i in range(messages):
            await bus.publish(topology.channel_subject(spec.channel, 0), b"{}", msg_id=f"m{i}")
        consumer = topology.consumer(spec, "one", [0])
        await bus.admin.ensure_consumer(consumer)
        yield bus, topology, consumer


async def state(bus: Bus, consumer: Any) -> ConsumerState:
    """The consumer's delivery state as the server reports it now."""
    view = await bus.admin.consumer(consumer.stream, consumer.durable)
    assert view is not None
    return view.state


async def test_a_puller_holds_no_more_than_the_room_it_was_given(nats_server):
    async with post_consumer(nats_server.url, 20) as (bus, _, consumer):
        puller = await bus.pull(consumer, largest=64)
        first = await take(puller, 5)
        await asyncio.sleep(0.3)  # time for anything beyond the room to be delivered
        assert (await state(bus, consumer)).ack_pending == 5
        for d in first:
            await d.ack()
        second = await take(puller, 8)
        assert [d.stream_seq for d in first + second] == list(range(1, 14))
        await asyncio.sleep(0.3)
        assert (await state(bus, consumer)).ack_pending == 8
        await puller.close()


async def test_a_waiting_request_delivers_what_is_stored_later_without_asking_again(nats_server):
    async with post_consumer(nats_server.url, 0) as (bus, topology, consumer):
        puller = await bus.pull(consumer, largest=64)
        assert await puller.fetch(10, 0.2) == []  # asked for 10; nothing there yet
        assert (await state(bus, consumer)).waiting == 1
        await bus.publish(topology.channel_subject("post", 0), b"{}", msg_id="late")
        got = await puller.fetch(10, 2.0, ask=False)
        assert [d.headers["Nats-Msg-Id"] for d in got] == ["late"]
        await puller.close()


async def test_an_unanswered_request_expires_and_the_puller_goes_idle(nats_server):
    async with post_consumer(nats_server.url, 0) as (bus, _, consumer):
        puller = await bus.pull(consumer, largest=64)
        assert puller.idle
        assert await puller.fetch(10, 0.1) == []
        assert not puller.idle  # the request still waits on the server
        assert await puller.fetch(10, REQUEST_EXPIRES + 1.0, ask=False) == []
        assert puller.idle  # the server said it expired
        assert (await state(bus, consumer)).waiting == 0
        await puller.close()


async def test_a_consumer_deleted_under_a_waiting_request_is_reported(nats_server):
    async with post_consumer(nats_server.url, 0) as (bus, _, consumer):
        puller = await bus.pull(consumer, largest=64)
        assert await puller.fetch(10, 0.1) == []
        await bus.admin.delete_consumer(consumer.stream, consumer.durable)
        with pytest.raises(BusError, match="consumer deleted"):
            await puller.fetch(10, 2.0, ask=False)
        assert puller.idle
        await puller.close()


async def test_requests_lost_in_a_server_restart_stop_counting_and_pulling_resumes(nats_binary):
    async with post_consumer(nats_binary.url, 0) as (bus, topology, consumer):
        puller = await bus.pull(consumer, largest=64)
        assert await puller.fetch(10, 0.1) == []
        nats_binary.stop()  # the waiting request goes with it, and no one says so
        nats_binary.start()
        await asyncio.sleep(REQUEST_EXPIRES + REQUEST_GRACE + 0.5)
        assert puller.idle
        await bus.publish(topology.channel_subject("post", 0), b"{}", msg_id="after")
        got = await take(puller, 1)
        assert got[0].headers["Nats-Msg-Id"] == "after"
        await puller.close()


async def test_a_cut_connection_never_leaves_more_than_the_room_delivered(nats_server):
    # While the connection is down nothing is asked for: nats-py would buffer the requests
    # and send them all, stale, once it reconnects.
    held: list[Delivery] = []
    stop = asyncio.Event()

    async def consume(puller: Puller) -> None:
        while not stop.is_set():
            room = 4 - len(held)
            if room == 0:
                await asyncio.sleep(0.05)
                continue
            with contextlib.suppress(BusError):
                held.extend(await puller.fetch(room, 0.5))

    async with post_consumer(nats_server.url, 0) as (bus, topology, consumer):
        proxy = CuttableProxy(int(nats_server.url.rsplit(":", 1)[1]))
        await proxy.start()
        far = await Bus.connect(f"nats://127.0.0.1:{proxy.port}", name="behind-proxy")
        try:
            puller = await far.pull(consumer, largest=64)
            task = asyncio.create_task(consume(puller))
            await asyncio.sleep(0.5)
            proxy.cut()
            await asyncio.sleep(REQUEST_EXPIRES + REQUEST_GRACE + 1.5)  # past every expiry
            subject = topology.channel_subject("post", 0)
            for i in range(50):
                await bus.publish(subject, b"{}", msg_id=f"m{i}")
            proxy.restore()
            async with asyncio.timeout(30):
                while len(held) < 4:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # time for anything beyond the room to be delivered
            assert (await state(bus, consumer)).ack_pending == 4
            stop.set()
            await task
        finally:
            await far.close()
            await proxy.stop()


async def test_reset_forgets_what_a_deleted_consumer_delivered(nats_server):
    async with post_consumer(nats_server.url, 5) as (bus, _, consumer):
        puller = await bus.pull(consumer, largest=64)
        assert await puller.fetch(5, 0) == []  # asked for 5, took nothing yet
        await asyncio.sleep(0.3)
        assert not puller.idle  # five received, none taken
        await bus.admin.delete_consumer(consumer.stream, consumer.durable)
        puller.reset()
        assert puller.idle
        assert await puller.fetch(5, 0.5, ask=False) == []
        await puller.close()


async def test_a_delivery_lost_on_the_way_is_noticed_when_a_later_one_comes(nats_server):
    async with post_consumer(nats_server.url, 1) as (bus, topology, consumer):
        puller = await bus.pull(consumer, largest=1)
        await take(puller, 1)
        assert puller.missing_since() is None
        # A second requester stands for a dying route: delivery 2 goes where it never
        # reaches this puller, whose request waits behind it.
        other = await bus.pull(consumer, largest=1)
        assert await other.fetch(1, 0.1) == []
        assert await puller.fetch(1, 0.1) == []
        for i in range(2):
            await bus.publish(topology.channel_subject("post", 0), b"{}", msg_id=f"n{i}")
        [taken_elsewhere] = await take(other, 1)
        [after_it] = await take(puller, 1)
        assert taken_elsewhere.headers["Nats-Msg-Id"] == "n0"
        assert after_it.headers["Nats-Msg-Id"] == "n1"
        assert puller.missing_since() is not None
        puller.reset()  # the consumer is recreated: nothing is owed any more
        assert puller.missing_since() is None
        await other.close()
        await puller.close()
