"""A stage's hot path through nats-py: publishes built here and handed to its outgoing
buffer, and messages of the busiest subscriptions handed over as nats-py parses them.

nats-py's `publish` validates each header key with a regular expression, strips and
translates every value and assembles the header block byte by byte: about 5 µs per message
with one header, against 1 µs for building the same `HPUB` command in one format. A stage
publishes twice per message (its output and its input's ack), so it builds them here and
queues them exactly as nats-py's own publish does (`_send_command`, then a kick of its
flusher), through the client's private buffer. Whatever this path cannot vouch for goes
through nats-py's `publish` unchanged: a connection that is not up (nats-py buffers those for
the reconnect) or is draining, a header key NATS would refuse, a value with a line break or
surrounding blanks, or a nats-py whose internals differ from the ones this was written
against (`supported`).

Inbound, nats-py makes a `Msg` of every message, queues it for the subscription's task, and
that task awaits the callback: three steps of the event loop's and about 3 µs per message
before the callback runs. A stage receives two messages per message it handles (the delivery
and its output's ack from the store), both on subscriptions whose callbacks only take note and
return, so `subscribe` calls such a handler as soon as nats-py has parsed the message and its
headers (`handles_inbound`). The subscription itself is nats-py's (it resubscribes on a
reconnect); a message of any other subscription, or of one that was unsubscribed, goes the
usual way.
"""

import asyncio
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

Handler = Callable[[str, str, bytes, dict[str, str] | None], None]
"""Takes (subject, reply, payload, headers) of a message; runs inside nats-py's read loop, so
it must return at once (it may set futures and events, not await)."""

LINGER = 0.01
"""Longest a message queued with `publish_soon` waits for something else to go out with."""

_HEADER_KEY = re.compile(r"[!-9;-~]+")  # what NATS and nats-py accept as a header key
_INTERNALS = ("_send_command", "_flush_queue", "_flush_pending", "_pending_data_size", "stats")
_INBOUND = ("_process_msg", "_process_headers", "_subs", "stats")


def supported(nc: NatsClient) -> bool:
    """Whether `nc` has the internals the fast path queues commands through."""
    return all(hasattr(nc, name) for name in _INTERNALS)


def handles_inbound(nc: NatsClient) -> bool:
    """Whether `nc` has the internals through which `subscribe` takes messages over."""
    return all(hasattr(nc, name) for name in _INBOUND)


class Wire:
    """Publishes and hot subscriptions of one connection."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._fast = supported(nc)
        self._keys: set[str] = set()  # header keys checked once
        self._direct: dict[int, Handler] = {}  # subscription id -> its handler
        self._hooked = False
        self._linger: asyncio.TimerHandle | None = None

    async def subscribe(self, subject: str, handler: Handler) -> Subscription:
        """Subscribe `handler` to `subject`: called with each message as nats-py parses it."""

        async def through_nats_py(msg: Msg) -> None:  # where the fast path is not taken
            handler(msg.subject, msg.reply, msg.data, msg.headers)

        sub = await self._nc.subscribe(subject, cb=through_nats_py)
        sid = getattr(sub, "_id", None)
        if isinstance(sid, int) and handles_inbound(self._nc):
            self._direct[sid] = handler
            self._hook()
        return sub

    def forget(self, sub: Subscription) -> None:
        """Stop handing `sub`'s messages over (call when unsubscribing it)."""
        self._direct.pop(getattr(sub, "_id", -1), None)

    def _hook(self) -> None:
        if self._hooked:
            return
        nc, direct = self._nc, self._direct
        usual = nc._process_msg
        subs, stats = nc._subs, nc.stats

        async def process_msg(
            sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any
        ) -> None:
            handler = direct.get(sid)
            if handler is None or sid not in subs:
                await usual(sid, subject, reply, data, headers)
                return
            stats["in_msgs"] += 1
            stats["in_bytes"] += len(data)
            parsed = await nc._process_headers(headers) if headers else None
            try:
                handler(subject.decode(), reply.decode(), data, parsed)
            except Exception:  # the read loop must go on: it carries every subscription
                log.exception("handler of %s failed", subject.decode(errors="replace"))

        nc._process_msg = process_msg  # type: ignore[method-assign]
        self._hooked = True

    async def publish(
        self,
        subject: str,
        payload: bytes,
        reply: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish `payload` to `subject` as nats-py's `Client.publish` would."""
        nc = self._nc
        if not self._fast or not nc.is_connected or nc.is_draining_pubs:
            await nc.publish(subject, payload, reply=reply, headers=headers)
            return
        if headers:
            block = self._header_block(headers)
            if block is None:
                await nc.publish(subject, payload, reply=reply, headers=headers)
                return
            size = len(block)
            cmd = b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
                subject.encode(), reply.encode(), size, size + len(payload), block, payload
            )  # fmt: skip
        elif reply:
            cmd = b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), len(payload),
                                              payload)  # fmt: skip
        else:
            cmd = _pub(subject, payload)
        _count(nc, payload)
        await nc._send_command(cmd)
        queue = nc._flush_queue
        if queue is not None and queue.empty():
            await nc._flush_pending()
        if self._linger is not None:  # what lingered goes out with this: no wake-up for it
            self._linger.cancel()
            self._linger = None

    async def publish_soon(self, subject: str, payload: bytes) -> None:
        """Queue a message without headers to go out with the next one written, or LINGER
        seconds from now if none is.

        For a delivery's ack: once its output is stored nothing waits for it, and going out
        with the next output (or the next ack) it costs the server no wake-up of its own,
        which on a lightly loaded stage is most of what a message costs it. A connection that
        closes flushes it first.
        """
        nc = self._nc
        if not self._fast or not nc.is_connected or nc.is_draining_pubs:
            await nc.publish(subject, payload)
            return
        _count(nc, payload)
        await nc._send_command(_pub(subject, payload))
        if self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(LINGER, self._flush_lingering)

    def _flush_lingering(self) -> None:
        self._linger = None
        nc = self._nc
        queue = nc._flush_queue
        # Written already if anything was published since (nats-py writes all it holds).
        if nc._pending_data_size and nc.is_connected and queue is not None and queue.empty():
            queue.put_nowait(asyncio.get_running_loop().create_future())  # its flusher's kick

    def _header_block(self, headers: Mapping[str, str]) -> bytes | None:
        """The header block of `headers`, or None if one of them needs nats-py's care."""
        lines = []
        for key, value in headers.items():
            if key not in self._keys:
                if not _HEADER_KEY.fullmatch(key):
                    return None
                self._keys.add(key)
            if "\r" in value or "\n" in value or value != value.strip():
                return None
            lines.append(f"{key}: {value}\r\n")
        return f"NATS/1.0\r\n{''.join(lines)}\r\n".encode()


def _pub(subject: str, payload: bytes) -> bytes:
    """The PUB command of a message without reply or headers."""
    return b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(payload), payload)


def _count(nc: NatsClient, payload: bytes) -> None:
    """Count a message sent in the client's statistics, as nats-py's publish does."""
    stats = nc.stats
    stats["out_msgs"] += 1
    stats["out_bytes"] += len(payload)
