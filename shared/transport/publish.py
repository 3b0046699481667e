"""Publishing to JetStream, with the store's ack matched through one inbox.

nats-py's `js.publish` is a request: per message a NUID, random bytes from the OS, a timer
for its timeout and a generic JSON parse into an API object, all on a stage's hot path. Here
a publish's reply subject is the inbox plus a counter, acks are parsed with orjson, and one
sweep every SWEEP_PERIOD fails the publishes whose ack is overdue, so no publish owns a timer.
"""

import asyncio
import contextlib
import itertools
import time
from collections.abc import Mapping
from typing import Any

import nats.errors
import orjson
from nats.aio.client import Client as NatsClient

from shared.errors import BusError, MessageTooLarge, NoSuchStream, Overloaded, PublishTimeout
from shared.transport.api import MSG_ID
from shared.transport.translate import STORE_FAILED
from shared.transport.wire import Wire

Answer = tuple[bytes, dict[str, str] | None]
"""A publish's answer from the server: its payload and headers."""

SWEEP_PERIOD = 0.25
"""How often overdue acks are looked for: a publish times out up to this much late."""


class Publisher:
    """Publishes of one connection, each awaiting the stream's ack."""

    def __init__(self, nc: NatsClient, timeout: float, wire: Wire) -> None:
        self._nc = nc
        self._wire = wire
        self._timeout = timeout
        self._prefix = nc.new_inbox() + "."
        self._count = itertools.count()
        # Insertion order is deadline order: every publish waits the same timeout.
        self._waiting: dict[str, tuple[asyncio.Future[Answer], float]] = {}
        self._sub: Any = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe to the acks' inbox and start the sweep."""
        self._sub = await self._wire.subscribe(self._prefix + "*", self._receive)
        self._sweeper = asyncio.create_task(self._sweep())

    async def stop(self) -> None:
        """Stop the sweep; acks still awaited fail as timed out."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for future, _ in self._waiting.values():
            if not future.done():
                future.set_exception(PublishTimeout("connection closed before the ack"))
        self._waiting.clear()

    async def publish(
        self, subject: str, data: bytes, *, msg_id: str, headers: Mapping[str, str] | None = None
    ) -> int:
        """Publish to JetStream and wait for the store's ack; return the stream sequence.

        Raises Overloaded when the stream is full, PublishTimeout when no ack came in time,
        MessageTooLarge when the message is over the server's max_payload.
        """
        return _stored(subject, await self._send(subject, data, msg_id, headers))[0]

    async def publish_once(
        self, subject: str, data: bytes, *, msg_id: str, headers: Mapping[str, str] | None = None
    ) -> bool:
        """As `publish`; True if stored now, False if a message with `msg_id` was stored
        before (within the stream's duplicate window)."""
        return not _stored(subject, await self._send(subject, data, msg_id, headers))[1]

    async def _send(
        self, subject: str, data: bytes, msg_id: str, headers: Mapping[str, str] | None
    ) -> Answer:
        hdrs = {MSG_ID: msg_id}
        if headers:
            hdrs.update(headers)
        # nats-py checks only the payload against max_payload; a message whose headers push it
        # over makes the server close the connection, so it is refused here instead.
        size = len(data) + sum(len(k) + len(v) + 4 for k, v in hdrs.items()) + 12
        if size > self._nc.max_payload:
            raise MessageTooLarge(
                f"{size} bytes with headers, over the server's max_payload of "
                f"{self._nc.max_payload}, for {subject}"
            )
        token = str(next(self._count))
        acked: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting[token] = (acked, time.monotonic() + self._timeout)
        try:
            await self._wire.publish(subject, data, self._prefix + token, hdrs)
        except BaseException as exc:  # cancelled too: no ack will be awaited
            self._waiting.pop(token, None)
            if isinstance(exc, nats.errors.Error):
                raise BusError(f"publish to {subject} failed: {exc}") from None
            raise
        try:
            return await acked
        except PublishTimeout:
            raise PublishTimeout(f"no ack for publish to {subject}") from None

    def _receive(
        self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None
    ) -> None:
        entry = self._waiting.pop(subject.removeprefix(self._prefix), None)
        if entry is not None and not entry[0].done():
            entry[0].set_result((data, headers))

    async def _sweep(self) -> None:
        waiting = self._waiting
        while True:
            await asyncio.sleep(SWEEP_PERIOD)
            now = time.monotonic()
            while waiting:
                token = next(iter(waiting))
                future, deadline = waiting[token]
                if deadline > now:
                    break
                del waiting[token]
                if not future.done():
                    future.set_exception(PublishTimeout("overdue"))


def _stored(subject: str, answer: Answer) -> tuple[int, bool]:
    """The stream sequence from a publish ack and whether it was a duplicate, or the error
    it reports."""
    data, headers = answer
    if not data and headers and headers.get("Status") == "503":
        raise NoSuchStream(  # no responders: no stream listens on the subject
            f"no stream stores {subject!r}: declare the topology (`orchestrator declare`)"
        )
    try:
        reply = orjson.loads(data)
        error = reply.get("error")
        if error:
            if error.get("err_code") == STORE_FAILED:
                raise Overloaded(subject, error.get("description", ""))
            raise BusError(f"publish to {subject} failed: {error.get('description', error)}")
        return int(reply["seq"]), bool(reply.get("duplicate"))
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        raise BusError(f"publish to {subject}: unreadable ack {data[:200]!r}") from None
