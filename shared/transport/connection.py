"""A connection to NATS with JetStream: the `Bus` everything above the transport is handed."""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NatsClient

from shared.errors import BusError, NotConnected
from shared.transport.admin import JetStreamAdmin
from shared.transport.api import BucketSpec, ConsumerSpec, StoredMessage
from shared.transport.keyvalue import JetStreamKeyValue, open_bucket
from shared.transport.publish import Publisher
from shared.transport.pull import JetStreamPuller, open_puller
from shared.transport.service import Endpoint, Handler, request_stream, serve
from shared.transport.subscribe import CoreSubscription, watch
from shared.transport.wire import Wire

log = logging.getLogger(__name__)


class Bus:
    """A NATS connection with JetStream, speaking the project's types (a `MessageBus`)."""

    def __init__(self, nc: NatsClient, publish_timeout: float) -> None:
        self._nc = nc
        self._js = nc.jetstream(timeout=publish_timeout)
        self._wire = Wire(nc)
        self._publisher = Publisher(nc, publish_timeout, self._wire)
        self.admin = JetStreamAdmin(nc.jsm())
        """Declaring and inspecting streams and consumers."""
        self.publish = self._publisher.publish
        self.publish_once = self._publisher.publish_once
        self.closing = False

    @classmethod
    async def connect(
        cls, url: str, *, name: str, publish_timeout: float = 5.0, wait: float = 30.0
    ) -> "Bus":
        """Connect to `url`, retrying for up to `wait` seconds; reconnects forever afterwards."""
        events = _ConnectionEvents(url)
        servers = [part.strip() for part in url.split(",")]  # a cluster: any of them will do
        try:
            # With unlimited reconnects nats-py retries a failing first connect forever too,
            # so the overall wait is bounded here.
            nc = await asyncio.wait_for(
                nats.connect(
                    servers,
                    name=name,
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=events.error,
                    disconnected_cb=events.disconnected,
                    reconnected_cb=events.reconnected,
                ),
                timeout=wait,
            )
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            cause = events.last_error or exc or "timed out"
            raise NotConnected(f"cannot reach NATS at {url} within {wait:g}s: {cause}") from None
        bus = cls(nc, publish_timeout)
        events.bus = bus
        try:
            await bus._publisher.start()
        except nats.errors.Error as exc:
            await nc.close()
            raise NotConnected(f"cannot subscribe at {url}: {exc!r}") from None
        return bus

    async def __aenter__(self) -> "Bus":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def max_payload(self) -> int:
        """The largest message (with its headers) the server accepts, from its INFO."""
        return self._nc.max_payload

    @property
    def connected(self) -> bool:
        """Whether the connection is up (not reconnecting, not closed)."""
        return bool(self._nc.is_connected)

    @property
    def connected_url(self) -> str:
        """The URL of the server this connection is attached to."""
        url = self._nc.connected_url
        return url.geturl() if url else ""

    async def flush(self) -> None:
        """A round trip to the server: once it returns, what the server sent before is in
        the subscriptions' queues. Never raises (a connection in trouble just returns)."""
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self._nc.flush(timeout=2)
        # nats-py hands messages to subscription callbacks from a task of its own.
        await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Flush what is buffered and close the connection."""
        if self._nc.is_closed:
            await self._publisher.stop()
            return
        self.closing = True
        if self._nc.is_connected:  # else a flush only waits out its timeout
            await self.flush()
        await self._publisher.stop()
        if not self._nc.is_connected:
            # Reconnecting: what nats-py buffered meanwhile can reach no server now, and its
            # close would write it to the socket that is gone (uvloop raises on that). An
            # unsent ack or publish is redelivered or retried like any other lost one.
            self._nc._pending, self._nc._pending_data_size = [], 0
        await self._nc.close()

    async def increment(self, subject: str, by: int, *, msg_id: str) -> None:
        """Add `by` to the counter on `subject` (a counter stream); once per `msg_id`."""
        await self.publish(subject, b"", msg_id=msg_id, headers={"Nats-Incr": f"{by:+d}"})

    async def emit(
        self, subject: str, data: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        """Publish without waiting for a store's ack (a stream on `subject` still stores it)."""
        try:
            await self._nc.publish(subject, data, headers=dict(headers) if headers else None)
        except nats.errors.Error as exc:
            raise BusError(f"publish to {subject} failed: {exc}") from None

    async def serve(
        self,
        *,
        name: str,
        version: str,
        description: str,
        subject: str,
        queue_group: str,
        handler: Handler,
        metadata: Mapping[str, str] | None = None,
        endpoint: str = "generate",
        stats: Callable[[], Any] | None = None,
    ) -> Endpoint:
        """A NATS micro service endpoint answering `subject` in `queue_group` (see
        shared.transport.service)."""
        return await serve(self._nc, name=name, version=version, description=description,
                           subject=subject, queue_group=queue_group, handler=handler,
                           metadata=metadata, endpoint=endpoint, stats=stats)  # fmt: skip

    def request_stream(
        self, subject: str, data: bytes, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[StoredMessage]:
        """Send a request and yield its replies as they come (see shared.transport.service)."""
        return request_stream(self._nc, subject, data, headers)

    async def pull(self, spec: ConsumerSpec, largest: int = 64) -> JetStreamPuller:
        """A continuous pull from the durable consumer of `spec` (see JetStreamPuller)."""
        return await open_puller(self._nc, spec, largest, self._wire)

    async def key_value(self, spec: BucketSpec, *, adjust: bool = True) -> JetStreamKeyValue:
        """Create (or bind to) the bucket of `spec`; with `adjust`, an existing one is brought
        to its replicas and placement."""
        return await open_bucket(self._js, spec, adjust=adjust)

    async def subscribe(self, subject: str) -> CoreSubscription:
        """Subscribe to `subject` with core NATS (no persistence; see `watch` for streams)."""
        return await CoreSubscription.open(self._nc, subject)

    def watch(self, subject: str) -> AsyncIterator[StoredMessage]:
        """Every stored message on `subject`, from the start, then new ones as they come."""
        return watch(self._nc, self._js, subject)


_RETRY_LOG_EVERY = 10.0
"""Seconds between log lines while (re)connecting fails: nats-py retries twice a second."""


class _ConnectionEvents:
    """Logs connection trouble, but not the disconnect that closing a connection causes.

    A failing reconnect is logged when it starts and then every _RETRY_LOG_EVERY seconds, not
    once per attempt; a failing first connect only after _RETRY_LOG_EVERY seconds, so a
    one-shot command that gives up sooner prints its error alone.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.bus: Bus | None = None
        self.last_error: Exception | None = None
        self._failing_since: float | None = None
        self._logged_at = 0.0

    async def error(self, exc: Exception) -> None:
        self.last_error = exc
        if self.bus is not None and self.bus.closing:
            return
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            if self.bus is None:  # a first connect: a command's own error will say it sooner
                self._logged_at = now
                return
        elif now - self._logged_at < _RETRY_LOG_EVERY:
            return
        self._logged_at = now
        waited = now - self._failing_since
        still = f"still failing after {waited:.0f}s: " if waited >= 1 else ""
        if self.bus is None:
            log.info("waiting for NATS at %s: %s%s", self.url, still, exc)
        else:
            log.warning("nats %s: %s%s", self.url, still, exc)

    async def disconnected(self) -> None:
        if not (self.bus and self.bus.closing):
            log.warning("nats %s: disconnected; reconnecting", self.url)

    async def reconnected(self) -> None:
        self._failing_since = None
        log.info("nats %s: reconnected", self.url)
