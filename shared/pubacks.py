"""Publish acks: JetStream's answer to each publish, matched through one inbox.

nats-py's `js.publish` is a request: per message a NUID, random bytes from the OS, a timer
for its timeout and a generic JSON parse into an API object, all on a stage's hot path. Here
a publish's reply subject is the inbox plus a counter, acks are parsed with orjson, and one
sweep every SWEEP_PERIOD fails the publishes whose ack is overdue, so no publish owns a timer.
Part of the bus: only shared.bus uses it.
"""

import asyncio
import contextlib
import itertools
import time
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

SWEEP_PERIOD = 0.25
"""How often overdue acks are looked for: a publish times out up to this much late."""


class AckTimeout(Exception):
    """No ack came within the publish timeout."""


class PublishAcks:
    """Futures for the acks of publishes in flight, resolved by one subscription."""

    def __init__(self, nc: NatsClient, timeout: float) -> None:
        self._nc = nc
        self._timeout = timeout
        self._prefix = nc.new_inbox() + "."
        self._count = itertools.count()
        # Insertion order is deadline order: every publish waits the same timeout.
        self._waiting: dict[str, tuple[asyncio.Future[Msg], float]] = {}
        self._sub: Any = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe to the acks' inbox and start the sweep."""
        self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._receive)
        self._sweeper = asyncio.create_task(self._sweep())

    def expect(self) -> tuple[str, asyncio.Future[Msg]]:
        """A reply subject for one publish, and the future its ack will resolve."""
        token = str(next(self._count))
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = (future, time.monotonic() + self._timeout)
        return self._prefix + token, future

    def forget(self, reply: str) -> None:
        """Stop waiting for the ack of a publish that never went out."""
        self._waiting.pop(reply.removeprefix(self._prefix), None)

    async def stop(self) -> None:
        """Stop the sweep; acks still awaited fail as timed out."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for future, _ in self._waiting.values():
            if not future.done():
                future.set_exception(AckTimeout())
        self._waiting.clear()

    async def _receive(self, msg: Msg) -> None:
        entry = self._waiting.pop(msg.subject.removeprefix(self._prefix), None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(msg)

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
                    future.set_exception(AckTimeout())
