"""The hot path's own publish: on a real server, a subscriber receives from `Wire.publish`
exactly what nats-py's `publish` sends, and whatever the fast path cannot vouch for still goes
out through nats-py."""

import asyncio

import nats
import pytest
from nats.aio.msg import Msg

from shared.transport.wire import Wire, supported

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


async def _received(url: str, send) -> list[Msg]:
    nc = await nats.connect(url)
    got: list[Msg] = []

    async def keep(msg: Msg) -> None:
        got.append(msg)

    sub = await nc.subscribe("wire.>", cb=keep)
    await nc.flush()
    try:
        await send()
        for _ in range(100):
            if len(got) == len(CASES):
                break
            await asyncio.sleep(0.02)
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

        expected = await _received(nats_server.url, by_nats_py)
        actual = await _received(nats_server.url, by_wire)
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
        for _ in range(100):
            if not nc.is_connected:
                break
            await asyncio.sleep(0.02)
        assert not nc.is_connected
        await wire.publish("wire.buffered", b"kept", "", {"K": "v"})
        nats_binary.start()
        for _ in range(300):
            if nc.is_connected:
                break
            await asyncio.sleep(0.02)
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
