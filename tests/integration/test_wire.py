"""The hot path's own publish: on a real server, a subscriber receives from `Wire.publish`
exactly what nats-py's `publish` sends, and whatever the fast path cannot vouch for still goes
out through nats-py."""

import asyncio
import contextlib
import time

import nats
import pytest
from nats.aio.msg import Msg

from shared.transport.wire import LINGER, Wire, handles_inbound, supported

CASES = [
    ("plain", b"payload", "", None),
    ("reply", b"payload", "_INBOX.r.1", None),
    ("empty payload", b"", "_INBOX.r.2", None),
    ("headers", b'{"x":1}', "_INBOX.r.3", {"Nats-Msg-Id": "abc:rag", "traceparent": "00-1-2-01"}),
    ("header, no reply", b"p", "", {"Orch-Replay-Of": "17"}),
    ("binary payload", bytes(range(256)) * 4, "", {"K": "v"}),
    ("unicode header value", b"p", "", {"K": "naïve ✓"}),
    # Not the fast path's: nats-py strips and translates these, and must still be the one to.
    ("value with a line break", b"p", "", {"K": "one\r\ntwo"}),
    ("value with spaces around", b"p", "", {"K": "  padded "}),
    ("key nats-py refuses", b"p", "", {"Bad Key": "v"}),
]


async def _until(check, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)


async def _received(url: str, sender: nats.NATS, send) -> list[Msg]:
    nc = await nats.connect(url)
    got: list[Msg] = []
    heard = asyncio.Event()

    async def keep(msg: Msg) -> None:
        if msg.subject == "wire.ready":
            heard.set()
        else:
            got.append(msg)

    sub = await nc.subscribe("wire.>", cb=keep)
    await nc.flush()
    # Now and then the server drops another connection's first messages to a subscription
    # whose SUB it has answered a PING after (once in a few thousand here): wait until this
    # one hears the sender, so that what it misses is the publish's doing.
    while not heard.is_set():
        await sender.publish("wire.ready", b"")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(heard.wait(), 0.2)
    try:
        await send()
        await _until(lambda: len(got) == len(CASES), 10.0)
        return got
    finally:
        await sub.unsubscribe()
        await nc.close()


async def _publish_all(nc: nats.NATS, publish) -> None:
    for i, (_, payload, reply, headers) in enumerate(CASES):
        try:
            await publish(f"wire.{i}", payload, reply, headers)
        except Exception as exc:  # what nats-py raised is compared too
            await nc.publish(f"wire.{i}", repr(type(exc)).encode())
    await nc.flush()


async def test_a_subscriber_receives_the_same_messages_as_from_nats_py(nats_server):
    sender = await nats.connect(nats_server.url)
    try:
        assert supported(sender)  # the nats-py installed has the internals the fast path uses
        wire = Wire(sender)

        async def by_nats_py() -> None:
            await _publish_all(sender, lambda s, p, r, h: sender.publish(s, p, reply=r, headers=h))

        async def by_wire() -> None:
            await _publish_all(sender, wire.publish)

        expected = await _received(nats_server.url, sender, by_nats_py)
        actual = await _received(nats_server.url, sender, by_wire)
    finally:
        await sender.close()
    assert len(expected) == len(CASES)

    def seen(msgs: list[Msg]) -> dict[str, tuple[bytes, str, dict[str, str] | None]]:
        return {m.subject: (m.data, m.reply, m.headers) for m in msgs}

    for i, (name, *_) in enumerate(CASES):
        subject = f"wire.{i}"
        assert seen(actual)[subject] == seen(expected)[subject], name


async def test_a_publish_while_disconnected_is_nats_py_s_to_buffer(nats_binary):
    # nats-py keeps what is published during a reconnect and sends it once connected again:
    # the fast path leaves a connection that is not up to it. The stream (on disk) shows it.
    nc = await nats.connect(nats_binary.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        await nc.jetstream().add_stream(name="W", subjects=["wire.>"])
        wire = Wire(nc)
        nats_binary.stop()
        await _until(lambda: not nc.is_connected)
        assert not nc.is_connected
        await wire.publish("wire.buffered", b"kept", "", {"K": "v"})
        nats_binary.start()
        await _until(lambda: nc.is_connected)
        await nc.flush()
        stored = await nc.jetstream().get_last_msg("W", "wire.buffered")
        assert (stored.data, stored.headers) == (b"kept", {"K": "v"})
    finally:
        await nc.close()


async def test_a_closed_connection_fails_as_nats_py_fails(nats_server):
    nc = await nats.connect(nats_server.url)
    await nc.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await Wire(nc).publish("wire.x", b"p")


async def test_a_hot_subscription_sees_what_a_nats_py_subscription_sees(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        assert handles_inbound(nc)
        wire = Wire(nc)
        usual: list[tuple[str, str, bytes, dict[str, str] | None]] = []
        hot: list[tuple[str, str, bytes, dict[str, str] | None]] = []

        async def keep(msg: Msg) -> None:
            usual.append((msg.subject, msg.reply, msg.data, msg.headers))

        await nc.subscribe("wire.>", cb=keep)
        tasks: set[asyncio.Task[object] | None] = set()

        def take(*parts: object) -> None:
            hot.append(parts)  # type: ignore[arg-type]
            tasks.add(asyncio.current_task())

        await wire.subscribe("wire.>", take)
        # and the server's own status messages: a pull request that finds nothing ends in one
        js = nc.jetstream()
        await js.add_stream(name="S", subjects=["s.>"])
        await js.add_consumer("S", durable_name="c")
        request = b'{"batch": 1, "expires": 100000000}'
        await nc.publish("$JS.API.CONSUMER.MSG.NEXT.S.c", request, reply="wire.pull.1")
        await _publish_all(nc, wire.publish)
        await _until(lambda: len(hot) == len(usual) == len(CASES) + 1)
        assert tasks == {nc._reading_task}  # handed over as parsed: no task of its own
    finally:
        await nc.close()
    assert hot == usual
    assert any(h and h.get("Status") == "408" for *_, h in hot)  # the request's end


async def test_a_failing_handler_costs_nothing_else(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        wire, seen = Wire(nc), []

        def broken(subject: str, *_: object) -> None:
            raise RuntimeError("a bug in a handler")

        await wire.subscribe("wire.bad", broken)
        sub = await wire.subscribe("wire.good", lambda subject, *_: seen.append(subject))
        for subject in ("wire.bad", "wire.good", "wire.bad", "wire.good"):
            await nc.publish(subject, b"p")
        await _until(lambda: len(seen) == 2)
        assert seen == ["wire.good", "wire.good"] and nc.is_connected
        wire.forget(sub)
        await sub.unsubscribe()
        await nc.publish("wire.good", b"p")
        await nc.flush()
        await asyncio.sleep(0.1)
        assert len(seen) == 2  # unsubscribed: no more calls
    finally:
        await nc.close()


async def test_a_hot_subscription_survives_a_reconnect(nats_binary):
    nc = await nats.connect(nats_binary.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        seen: list[bytes] = []
        await Wire(nc).subscribe("wire.x", lambda _s, _r, data, _h: seen.append(data))
        nats_binary.stop()
        await _until(lambda: not nc.is_connected)
        nats_binary.start()
        await _until(lambda: nc.is_connected)
        await nc.flush()
        await nc.publish("wire.x", b"after")
        await _until(lambda: bool(seen))
        assert seen == [b"after"]
    finally:
        await nc.close()


async def test_an_ack_goes_out_with_the_next_message_or_soon_after(nats_server):
    nc = await nats.connect(nats_server.url)
    watcher = await nats.connect(nats_server.url)
    try:
        seen: list[tuple[float, str]] = []

        async def note(msg: Msg) -> None:
            seen.append((time.monotonic(), msg.subject))

        await watcher.subscribe("wire.>", cb=note)
        await watcher.flush()
        wire = Wire(nc)
        sent = time.monotonic()
        await wire.publish_soon("wire.ack", b"")
        await _until(lambda: bool(seen))
        assert [s for _, s in seen] == ["wire.ack"]  # alone, it waited at most LINGER
        assert seen[0][0] - sent < LINGER + 0.5
        seen.clear()
        await wire.publish_soon("wire.ack2", b"")
        await wire.publish("wire.next", b"p")  # written at once, the ack with it
        await _until(lambda: len(seen) == 2)
        assert [s for _, s in seen] == ["wire.ack2", "wire.next"]
        await wire.publish_soon("wire.last", b"")
        await nc.flush()  # as closing a bus does: nothing queued is left behind
        await _until(lambda: len(seen) == 3)
    finally:
        await nc.close()
        await watcher.close()
