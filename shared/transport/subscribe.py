"""Core NATS subscriptions, and an ordered replay of a stream's subject."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

from shared.errors import BusError
from shared.transport.api import StoredMessage

RESUBSCRIBE = 0.5
"""Seconds between attempts to start a watch again after broker trouble."""


class CoreSubscription:
    """A core NATS subscription feeding a local queue.

    nats-py's `next_msg` can leave an inner task waiting forever when it is cancelled, so
    messages are handed over by callback and waited for with plain asyncio.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[StoredMessage] = asyncio.Queue()
        self._sub: Any = None

    @classmethod
    async def open(cls, nc: NatsClient, subject: str) -> "CoreSubscription":
        """Subscribe to `subject`."""
        sub = cls()
        sub._sub = await nc.subscribe(subject, cb=sub._on_message)
        return sub

    async def _on_message(self, msg: Msg) -> None:
        self._queue.put_nowait(StoredMessage(0, msg.subject, msg.data, msg.headers or {}))

    async def next_message(self, timeout: float) -> StoredMessage | None:
        """The next message (subject, payload, headers), or None after `timeout` seconds."""
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that races with the message arriving.
        try:
            async with asyncio.timeout(max(timeout, 0.001)):
                return await self._queue.get()
        except TimeoutError:
            return None

    def next_nowait(self) -> StoredMessage | None:
        """A message already received, or None."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def close(self) -> None:
        """Stop receiving."""
        with contextlib.suppress(nats.errors.Error):
            await self._sub.unsubscribe()


async def watch(nc: NatsClient, js: JetStreamContext, subject: str) -> AsyncIterator[StoredMessage]:
    """Yield every stored message on `subject`, from the start, then new ones as they come.

    Broker trouble (no stream leader during an election, a reconnect) does not end it: the
    watch starts again after the last message it yielded, each message once.
    """
    next_seq = 1
    while not nc.is_closed:
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                                    opt_start_seq=next_seq)  # fmt: skip
        try:
            sub = await js.subscribe(subject, ordered_consumer=True, config=config)
        except (nats.errors.Error, TimeoutError) as exc:
            if nc.is_closed:
                raise BusError(f"watch {subject}: {exc!r}") from None
            await asyncio.sleep(RESUBSCRIBE)
            continue
        try:
            async for msg in sub.messages:
                seq = msg.metadata.sequence.stream
                if seq < next_seq:
                    continue
                next_seq = seq + 1
                yield StoredMessage(seq, msg.subject, msg.data, msg.headers or {})
        except (nats.errors.Error, TimeoutError):
            await asyncio.sleep(RESUBSCRIBE)
        finally:
            if not nc.is_closed:
                with contextlib.suppress(nats.errors.Error, TimeoutError):
                    await sub.unsubscribe()
