"""Consuming: a continuous pull from a durable consumer, and the deliveries it yields."""

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Mapping
from typing import Any

import nats.errors
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from shared.errors import BusError
from shared.transport.api import ConsumerSpec
from shared.transport.wire import Wire

log = logging.getLogger(__name__)

REQUEST_EXPIRES = 1.0
"""Seconds a pull request waits on the server for messages."""
REQUEST_GRACE = 0.25
"""Past that, how long its end may take to be reported. A request the server lost (its
consumer's leader died) holds back new ones this long, so it is kept short: forgetting a
request the server still serves only lets a few more messages in than asked for."""


class JetStreamDelivery:
    """One message handed to a consumer, with the operations that settle it."""

    __slots__ = ("_nc", "_reply", "_wire", "data", "delivered", "delivery_seq", "headers",
                 "stream_seq", "subject")  # fmt: skip

    def __init__(
        self,
        nc: NatsClient | None,
        subject: str,
        reply: str,
        data: bytes,
        headers: Mapping[str, str] | None,
        wire: Wire,
    ) -> None:
        self._nc = nc
        self._reply = reply
        self._wire = wire
        self.data = data
        self.subject = subject
        self.headers: Mapping[str, str] = headers or {}
        # The numbers needed, read straight from the ack subject ($JS.ACK.[<domain>.<account>.]
        # <stream>.<consumer>.<delivered>.<stream seq>.<delivery seq>...): nats-py's
        # `metadata` also builds a datetime and three objects per message.
        tokens = reply.split(".")
        at = 4 if len(tokens) == 9 else 6 if len(tokens) >= 11 else 0
        self.delivered: int
        self.stream_seq: int
        self.delivery_seq: int
        if at and tokens[1] == "ACK":
            self.delivered, self.stream_seq = int(tokens[at]), int(tokens[at + 1])
            self.delivery_seq = int(tokens[at + 2])
        else:
            meta = self._msg().metadata  # raises for what is not a JetStream delivery
            self.delivered, self.stream_seq = meta.num_delivered, meta.sequence.stream
            self.delivery_seq = meta.sequence.consumer

    def _msg(self) -> Msg:
        # nats-py's message, for what is rare enough not to need a faster way.
        return Msg(_client=self._nc, subject=self.subject, reply=self._reply,  # type: ignore[arg-type]
                   data=self.data, headers=dict(self.headers))  # fmt: skip

    async def ack(self) -> None:
        """Settle as done; the work-queue stream deletes the message."""
        # nats-py's ack, built for less, going out with the next message written
        await self._wire.publish_soon(self._reply, b"")

    async def nak(self, delay: float | None = None) -> None:
        """Ask for redelivery, after `delay` seconds when given."""
        await self._msg().nak(delay=delay)

    async def term(self) -> None:
        """Stop redelivery for good."""
        await self._msg().term()

    async def in_progress(self) -> None:
        """Reset the ack timer: the work is still going on."""
        await self._msg().in_progress()


class JetStreamPuller:
    """A continuous pull from a durable consumer.

    Pull requests stay outstanding on the server, so a message is pushed to the instance as
    soon as it is stored instead of waiting for the next fetch round trip, and an idle stage
    costs one request per `REQUEST_EXPIRES`. The credit (messages asked for and not yet
    delivered) plus what is received and not yet taken never exceeds the room the caller
    last gave, so an instance holds no more un-acked messages than it can work on.
    """

    def __init__(self, nc: NatsClient, next_subject: str, largest: int, wire: Wire) -> None:
        self._nc = nc
        self._wire = wire
        self._next = next_subject
        self._largest = largest
        # Each request has its own reply subject, so the server's word that one has ended
        # (a status message sent to it) is matched to that request.
        self._inbox = nc.new_inbox()
        self._requests = itertools.count()
        self._sub: Any = None
        self._ready: collections.deque[JetStreamDelivery] = collections.deque()
        self._credit = 0
        # Requests not known to have ended: reply token -> (when to stop counting it, size).
        self._open: dict[str, tuple[float, int]] = {}
        self._reconnects = 0
        self._arrived = asyncio.Event()
        self._error: str | None = None
        self._gaps = DeliveryGaps()

    async def start(self) -> None:
        """Subscribe to the inbox the consumer's messages are delivered to."""
        self._reconnects = self._nc.stats["reconnects"]
        self._sub = await self._wire.subscribe(self._inbox + ".*", self._receive)

    @property
    def idle(self) -> bool:
        """Nothing asked for is still to come, and nothing received is left to take."""
        self._prune()
        return not self._ready and self._credit == 0

    @property
    def backlog(self) -> int:
        """Deliveries received and not yet taken by `fetch`."""
        return len(self._ready)

    def reset(self) -> None:
        """Forget what was asked for and received: the consumer was deleted, and what it
        delivered is delivered again by its successor."""
        self._ready.clear()
        self._open.clear()
        self._credit = 0
        self._error = None
        self._gaps = DeliveryGaps()

    def missing_since(self) -> float | None:
        """Since when (time.monotonic) a delivery the server sent has been missing here,
        lost on the way; None when none is."""
        return self._gaps.since

    async def fetch(
        self, room: int, timeout: float, *, ask: bool = True
    ) -> list[JetStreamDelivery]:
        """Up to `room` messages: those already received, else the first to arrive within
        `timeout` ([] when none did). With `ask`, first asks for more, up to `room`, when
        at least half of it is not yet covered; without it, only takes in what was asked for.
        """
        self._prune()
        self._raise_error()
        if ask:
            await self._ask(room)
        if not self._ready:
            if not ask and self._credit == 0:
                return []
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()
            self._raise_error()
        ready, count = self._ready, min(room, len(self._ready))
        return [ready.popleft() for _ in range(count)]

    async def close(self) -> None:
        """Stop pulling. The server drops requests whose inbox has no subscriber; what is
        delivered and not acked is redelivered to other instances after ack_wait."""
        if self._sub is not None:
            self._wire.forget(self._sub)
            with contextlib.suppress(nats.errors.Error, ValueError):
                await self._sub.unsubscribe()

    async def _ask(self, room: int) -> None:
        if not self._nc.is_connected:
            return  # nats-py would buffer the request and send it, stale, after reconnecting
        uncovered = room - self._credit - len(self._ready)
        if uncovered < max(1, min(room, self._largest) // 2):
            return  # asking for a few at a time costs a request per few messages
        size = min(uncovered, self._largest)
        token = str(next(self._requests))
        request = orjson.dumps({"batch": size, "expires": int(REQUEST_EXPIRES * 1e9)})
        try:
            await self._nc.publish(self._next, request, reply=f"{self._inbox}.{token}")
        except nats.errors.Error as exc:
            raise BusError(f"pull request failed: {exc!r}") from None
        self._credit += size
        self._open[token] = (time.monotonic() + REQUEST_EXPIRES + REQUEST_GRACE, size)

    def _receive(
        self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None
    ) -> None:
        if reply:  # a JetStream delivery: it carries its ack subject
            try:
                delivery = JetStreamDelivery(self._nc, subject, reply, data, headers, self._wire)
            except Exception as exc:  # nothing on this inbox may stop the stage
                log.warning("dropped a message on the pull inbox: %r", exc)
                return
            self._gaps.saw(delivery.delivery_seq)
            self._ready.append(delivery)
            self._credit = max(0, self._credit - 1)
        elif headers and headers.get("Status", "100") != "100":  # not a heartbeat
            self._ended(subject.rpartition(".")[2], headers)
        else:
            return
        self._arrived.set()

    def _ended(self, token: str, headers: Mapping[str, str]) -> None:
        if self._open.pop(token, None) is None:
            return  # forgotten already: expired here, or asked for before a reset
        pending = headers.get("Nats-Pending-Messages")
        if pending is not None and pending.isdigit():
            self._credit = max(0, self._credit - int(pending))
        else:
            self._credit = min(self._credit, sum(size for _, size in self._open.values()))
        status, description = headers["Status"], headers.get("Description", "")
        if status == "409" and "Deleted" in description:
            self._error = "consumer deleted"
        elif status not in ("408", "409"):  # 408: expired; other 409s: leadership change...
            self._error = f"pull request failed: {status} {description}".rstrip()

    def _prune(self) -> None:
        reconnects = self._nc.stats["reconnects"]
        if reconnects != self._reconnects:
            # The server dropped the old connection's requests along with its interest.
            self._reconnects = reconnects
            self._open.clear()
        # A request whose end the server never reported stops counting a little after it
        # expired, so lost credit can never stall the stage.
        now, stale, requests = time.monotonic(), False, self._open
        while requests:
            oldest = next(iter(requests))  # insertion order is expiry order
            if requests[oldest][0] >= now:
                break
            del requests[oldest]
            stale = True
        if stale or not requests:
            self._credit = min(self._credit, sum(size for _, size in self._open.values()))

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise BusError(error)


class DeliveryGaps:
    """Deliveries of one consumer that never arrived, found from their sequence numbers.

    A consumer numbers its deliveries 1, 2, 3... and one connection carries them in order,
    so a number skipped is a delivery lost on the way (its route or server died), which the
    server would otherwise redeliver only after ack_wait. A number lower than expected means
    a new consumer leader numbers from what it knew: what it did not know it delivers afresh.
    """

    __slots__ = ("_expected", "_gaps")

    def __init__(self) -> None:
        self._expected: int | None = None
        self._gaps: list[tuple[int, int, float]] = []  # first, last missing, noticed at

    def saw(self, seq: int) -> None:
        """Delivery number `seq` arrived."""
        expected = self._expected
        if expected is None or seq == expected:
            self._expected = seq + 1
            return
        if seq > expected:
            self._gaps.append((expected, seq - 1, time.monotonic()))
        else:  # renumbered from `seq` on: what was missing from there is not owed
            self._gaps = [(lo, min(hi, seq - 1), at) for lo, hi, at in self._gaps if lo < seq]
        self._expected = seq + 1

    @property
    def since(self) -> float | None:
        """When the oldest gap was noticed, or None."""
        return self._gaps[0][2] if self._gaps else None


async def open_puller(
    nc: NatsClient, spec: ConsumerSpec, largest: int, wire: Wire
) -> JetStreamPuller:
    """A continuous pull from the durable consumer of `spec`, asking for at most `largest`
    messages per pull request (acks go out through `wire`)."""
    puller = JetStreamPuller(nc, f"$JS.API.CONSUMER.MSG.NEXT.{spec.stream}.{spec.durable}",
                             largest, wire)  # fmt: skip
    try:
        await puller.start()
    except nats.errors.Error as exc:
        raise BusError(f"cannot pull from consumer {spec.durable}: {exc!r}") from None
    return puller
