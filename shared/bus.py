"""The bus: the only module that talks to nats-py (with shared.pubacks, its publish acks).

Everything above it speaks the project's own types: `StreamSpec`/`ConsumerSpec` to declare,
`Delivery` for a received message, and the errors in shared.errors.
"""

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api

from shared.errors import (
    BusError,
    MessageTooLarge,
    NotConnected,
    Overloaded,
    PublishTimeout,
    SubjectTaken,
    TopologyError,
)
from shared.pubacks import AckTimeout, PublishAcks
from shared.topology import ConsumerSpec, StreamSpec

log = logging.getLogger(__name__)

MSG_ID = "Nats-Msg-Id"
_STORE_FAILED = 10077  # JetStream "store failed": the stream is full under discard=new
_NO_SUCH_MESSAGE = 10057
_FILTER_NOT_UNIQUE = 10100  # another consumer of a work-queue stream already has the subject
REQUEST_EXPIRES = 1.0  # seconds a pull request waits on the server for messages
REQUEST_GRACE = 1.0  # past that, how long its end may take to be reported


_RAISE: Any = object()


async def _query(call: Awaitable[Any], what: str, missing: Any = _RAISE) -> Any:
    """Await a JetStream API call, translating its errors into the project's.

    "Not found" returns `missing` when one is given; every other failure (an API error, a
    timeout, a closed connection) becomes a BusError naming `what`.
    """
    try:
        return await call
    except nats.js.errors.APIError as exc:
        gone = isinstance(exc, nats.js.errors.NotFoundError) or exc.err_code == _NO_SUCH_MESSAGE
        if gone and missing is not _RAISE:
            return missing
        raise BusError(f"{what}: {exc.description}") from None
    except nats.errors.Error as exc:
        raise BusError(f"{what}: {exc!r}") from None


class Delivery:
    """One message handed to a consumer, with the operations that settle it."""

    __slots__ = ("_msg", "data", "delivered", "headers", "stream_seq", "subject")

    def __init__(self, msg: Msg) -> None:
        self._msg = msg
        self.data: bytes = msg.data
        self.subject: str = msg.subject
        self.headers: Mapping[str, str] = msg.headers or {}
        # The two numbers the runtime needs, read straight from the ack subject
        # ($JS.ACK.[<domain>.<account>.]<stream>.<consumer>.<delivered>.<stream seq>...):
        # nats-py's `metadata` also builds a datetime and three objects per message.
        tokens = (msg.reply or "").split(".")
        at = 4 if len(tokens) == 9 else 6 if len(tokens) >= 11 else 0
        self.delivered: int
        self.stream_seq: int
        if at and tokens[1] == "ACK":
            self.delivered, self.stream_seq = int(tokens[at]), int(tokens[at + 1])
        else:
            meta = msg.metadata  # raises for what is not a JetStream delivery
            self.delivered, self.stream_seq = meta.num_delivered, meta.sequence.stream

    async def ack(self) -> None:
        """Settle as done; the work-queue stream deletes the message."""
        await self._msg.ack()

    async def nak(self, delay: float | None = None) -> None:
        """Ask for redelivery, after `delay` seconds when given."""
        await self._msg.nak(delay=delay)

    async def term(self) -> None:
        """Stop redelivery for good."""
        await self._msg.term()

    async def in_progress(self) -> None:
        """Reset the ack timer: the work is still going on."""
        await self._msg.in_progress()


@dataclass(frozen=True)
class StoredMessage:
    """A message read back from a stream by sequence or subject."""

    seq: int
    subject: str
    data: bytes
    headers: Mapping[str, str]


@dataclass(frozen=True)
class StreamState:
    """Counters of a stream, as the server reports them."""

    messages: int
    bytes: int
    last_seq: int


@dataclass(frozen=True)
class ConsumerState:
    """Counters of a consumer, as the server reports them."""

    pending: int
    ack_pending: int
    redelivered: int
    waiting: int
    ack_floor: int = 0
    """Stream sequence up to which every message the consumer was given is acked."""
    delivered: int = 0
    """Stream sequence of the last message the consumer was given."""


@dataclass(frozen=True)
class ConsumerView:
    """A consumer as listed by the server."""

    name: str
    subjects: tuple[str, ...]
    created: float
    state: ConsumerState


class Bus:
    """A NATS connection with JetStream, speaking the project's types."""

    def __init__(self, nc: NatsClient, publish_timeout: float) -> None:
        self._nc = nc
        self._js = nc.jetstream(timeout=publish_timeout)
        self._jsm = nc.jsm()
        self._acks = PublishAcks(nc, publish_timeout)
        self.closing = False

    @classmethod
    async def connect(
        cls, url: str, *, name: str, publish_timeout: float = 5.0, wait: float = 30.0
    ) -> "Bus":
        """Connect to `url`, retrying for up to `wait` seconds; reconnects forever afterwards."""
        events = _ConnectionEvents(url)
        try:
            # With unlimited reconnects nats-py retries a failing first connect forever too,
            # so the overall wait is bounded here.
            nc = await asyncio.wait_for(
                nats.connect(
                    url,
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
            await bus._acks.start()
        except nats.errors.Error as exc:
            await nc.close()
            raise NotConnected(f"cannot subscribe at {url}: {exc!r}") from None
        return bus

    async def __aenter__(self) -> "Bus":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def connected_url(self) -> str:
        """The URL of the server this connection is attached to."""
        url = self._nc.connected_url
        return url.geturl() if url else ""

    async def close(self) -> None:
        """Flush what is buffered and close the connection."""
        if self._nc.is_closed:
            await self._acks.stop()
            return
        self.closing = True
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self._nc.flush(timeout=2)
        await self._acks.stop()
        await self._nc.close()

    # -- declaring -------------------------------------------------------------------------

    async def ensure_stream(self, spec: StreamSpec) -> str:
        """Create the stream, or bring it in line with `spec`; return what was done."""
        want = _stream_config(spec)
        info = await _query(self._jsm.stream_info(spec.name), f"read stream {spec.name}", None)
        if info is None:
            await self._api(self._jsm.add_stream(want), f"create stream {spec.name}")
            return "created"
        diff = _diff(info.config, want, _STREAM_FIELDS)
        if not diff:
            return "unchanged"
        await self._api(self._jsm.update_stream(want), f"update stream {spec.name} ({diff})")
        return f"updated ({diff})"

    async def ensure_consumer(self, spec: ConsumerSpec) -> str:
        """Create the durable consumer, or bring it in line with `spec`; return what was done."""
        want = _consumer_config(spec)
        what = f"read consumer {spec.durable}"
        info = await _query(self._jsm.consumer_info(spec.stream, spec.durable), what, None)
        if info is None:
            what = f"create consumer {spec.durable} on {spec.stream}"
            await self._api(self._jsm.add_consumer(spec.stream, want), what)
            return "created"
        diff = _diff(info.config, want, _CONSUMER_FIELDS)
        if not diff:
            return "unchanged"
        what = f"update consumer {spec.durable} on {spec.stream} ({diff})"
        await self._api(self._jsm.add_consumer(spec.stream, want), what)
        return f"updated ({diff})"

    async def _api(self, call: Any, what: str) -> Any:
        try:
            return await call
        except nats.js.errors.APIError as exc:
            if exc.err_code == _FILTER_NOT_UNIQUE:
                raise SubjectTaken(f"cannot {what}: {exc.description}") from None
            raise TopologyError(
                f"cannot {what}: {exc.description} (server error {exc.err_code}); "
                "fix the configuration or remove the old stream/consumer"
            ) from None
        except nats.errors.Error as exc:
            raise BusError(f"cannot {what}: {exc}") from None

    async def delete_consumer(self, stream: str, name: str) -> bool:
        """Delete a consumer; False if it was already gone. Its un-acked messages are freed."""
        what = f"delete consumer {name} on {stream}"
        return await _query(self._jsm.delete_consumer(stream, name), what, False)

    async def consumers(self, stream: str) -> list[ConsumerView]:
        """Every consumer of `stream`, with its subjects and counters; none if no stream."""
        infos = await _query(self._jsm.consumers_info(stream), f"list consumers of {stream}", [])
        return [_consumer_view(info) for info in infos]

    async def consumer(self, stream: str, name: str) -> ConsumerView | None:
        """One consumer of `stream`, or None if there is no such consumer."""
        what = f"read consumer {name} on {stream}"
        info = await _query(self._jsm.consumer_info(stream, name), what, None)
        return None if info is None else _consumer_view(info)

    async def key_value(self, bucket: str, ttl: float, storage: str) -> "KeyValueStore":
        """Create (or bind to) a key-value bucket whose entries expire `ttl` s after a put."""
        config = api.KeyValueConfig(
            bucket=bucket, history=1, ttl=ttl, storage=api.StorageType(storage)
        )
        try:
            kv = await self._js.create_key_value(config=config)
        except nats.js.errors.APIError:
            kv = await self._js.key_value(bucket)  # exists with other limits: use it as it is
        return KeyValueStore(kv, bucket)

    # -- publishing ------------------------------------------------------------------------

    async def publish(
        self, subject: str, data: bytes, *, msg_id: str, headers: Mapping[str, str] | None = None
    ) -> int:
        """Publish to JetStream and wait for the store's ack; return the stream sequence.

        Raises Overloaded when the stream is full, PublishTimeout when no ack came in time.
        """
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
        reply, acked = self._acks.expect()
        try:
            await self._nc.publish(subject, data, reply=reply, headers=hdrs)
        except BaseException as exc:  # cancelled too: no ack will be awaited
            self._acks.forget(reply)
            if isinstance(exc, nats.errors.Error):
                raise BusError(f"publish to {subject} failed: {exc}") from None
            raise
        try:
            answer = await acked
        except AckTimeout:
            raise PublishTimeout(f"no ack for publish to {subject}") from None
        return _stored_seq(subject, answer)

    # -- consuming -------------------------------------------------------------------------

    async def pull(self, spec: ConsumerSpec, largest: int = 64) -> "Puller":
        """A continuous pull from the durable consumer of `spec`, asking for at most
        `largest` messages per pull request."""
        puller = Puller(self._nc, f"$JS.API.CONSUMER.MSG.NEXT.{spec.stream}.{spec.durable}",
                        largest)  # fmt: skip
        try:
            await puller.start()
        except nats.errors.Error as exc:
            raise BusError(f"cannot pull from consumer {spec.durable}: {exc!r}") from None
        return puller

    async def stream_state(self, stream: str) -> StreamState:
        """How many messages `stream` holds, and the sequence of the last one ever stored."""
        info = await _query(self._jsm.stream_info(stream), f"read stream {stream}")
        return StreamState(info.state.messages, info.state.bytes, info.state.last_seq)

    async def last_message(self, stream: str, subject: str) -> StoredMessage | None:
        """The last message stored on `subject`, or None."""
        raw = await _query(self._jsm.get_last_msg(stream, subject), f"read {subject}", None)
        if raw is None:
            return None
        return StoredMessage(
            raw.seq or 0, raw.subject or subject, raw.data or b"", raw.headers or {}
        )

    async def message_at(self, stream: str, seq: int, subject: str) -> StoredMessage | None:
        """The first message at or after `seq` whose subject matches `subject`, or None."""
        call = self._jsm.get_msg(stream, seq=seq, subject=subject, next=True)
        raw = await _query(call, f"read {stream} at {seq}", None)
        if raw is None:
            return None
        return StoredMessage(raw.seq or seq, raw.subject or "", raw.data or b"", raw.headers or {})

    async def delete(self, stream: str, seq: int) -> bool:
        """Delete message `seq` from `stream`; False when it was already gone."""
        return await _query(self._jsm.delete_msg(stream, seq), f"delete {stream} #{seq}", False)

    async def subject_counts(self, stream: str, subject: str) -> dict[str, int]:
        """How many messages `stream` holds per subject matching `subject`."""
        call = self._jsm.stream_info(stream, subjects_filter=subject)
        info = await _query(call, f"count subjects of {stream}")
        return dict(info.state.subjects or {})

    async def increment(self, subject: str, by: int, *, msg_id: str) -> None:
        """Add `by` to the counter on `subject` (a counter stream); once per `msg_id`."""
        await self.publish(subject, b"", msg_id=msg_id, headers={"Nats-Incr": f"{by:+d}"})

    async def counter(self, stream: str, subject: str) -> int:
        """The value of the counter on `subject`, 0 if it was never incremented."""
        stored = await self.last_message(stream, subject)
        if stored is None or not stored.data:
            return 0
        return int(orjson.loads(stored.data)["val"])

    async def subscribe_core(self, subject: str) -> "CoreSubscription":
        """Subscribe to `subject` with core NATS (no persistence; see `watch` for streams)."""
        sub = CoreSubscription()
        sub._sub = await self._nc.subscribe(subject, cb=sub._on_message)
        return sub

    async def watch(self, subject: str) -> AsyncIterator[StoredMessage]:
        """Yield every stored message on `subject`, from the start, then new ones as they come."""
        sub = await self._js.subscribe(subject, ordered_consumer=True)
        try:
            async for msg in sub.messages:
                meta = msg.metadata
                yield StoredMessage(meta.sequence.stream, msg.subject, msg.data, msg.headers or {})
        finally:
            if not self._nc.is_closed:
                await sub.unsubscribe()


class KeyValueStore:
    """A JetStream key-value bucket."""

    def __init__(self, kv: Any, bucket: str) -> None:
        self._kv = kv
        self.bucket = bucket

    def subject(self, key: str) -> str:
        """The subject a put or delete of `key` is published on (wildcards allowed)."""
        return f"$KV.{self.bucket}.{key}"

    async def put(self, key: str, value: bytes) -> None:
        """Store `value` under `key`."""
        try:
            await self._kv.put(key, value)
        except nats.errors.Error as exc:
            raise BusError(f"put {self.bucket}/{key}: {exc}") from None

    async def create(self, key: str, value: bytes) -> bool:
        """Store `value` under `key` unless the key holds a value already; True if stored."""
        try:
            await self._kv.create(key, value)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        except nats.errors.Error as exc:
            raise BusError(f"create {self.bucket}/{key}: {exc}") from None
        return True

    async def delete(self, key: str) -> None:
        """Delete `key` (watchers see a delete marker)."""
        try:
            await self._kv.delete(key)
        except nats.errors.Error as exc:
            raise BusError(f"delete {self.bucket}/{key}: {exc}") from None

    async def exists(self, key: str) -> bool:
        """Whether `key` holds a live value."""
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return False
        except nats.errors.Error as exc:
            raise BusError(f"get {self.bucket}/{key}: {exc}") from None
        return entry.value is not None

    async def items(self, prefix: str) -> dict[str, bytes]:
        """Every live key starting with `prefix`, with its value."""
        try:
            keys = await self._kv.keys()
        except nats.js.errors.NoKeysError:
            return {}
        out = {}
        for key in (k for k in keys if k.startswith(prefix)):
            try:
                entry = await self._kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue
            if entry.value is not None:
                out[key] = entry.value
        return out


class CoreSubscription:
    """A core NATS subscription feeding a local queue.

    nats-py's `next_msg` can leave an inner task waiting forever when it is cancelled, so
    messages are handed over by callback and waited for with plain asyncio.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[StoredMessage] = asyncio.Queue()
        self._sub: Any = None

    async def _on_message(self, msg: Msg) -> None:
        self._queue.put_nowait(StoredMessage(0, msg.subject, msg.data, msg.headers or {}))

    async def next(self, timeout: float) -> bytes | None:
        """The next payload, or None after `timeout` seconds."""
        msg = await self.next_message(timeout)
        return None if msg is None else msg.data

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


class Puller:
    """A continuous pull from a durable consumer.

    Pull requests stay outstanding on the server, so a message is pushed to the instance as
    soon as it is stored instead of waiting for the next fetch round trip, and an idle stage
    costs one request per `REQUEST_EXPIRES`. The credit (messages asked for and not yet
    delivered) plus what is received and not yet taken never exceeds the room the caller
    last gave, so an instance holds no more un-acked messages than it can work on.
    """

    def __init__(self, nc: NatsClient, next_subject: str, largest: int) -> None:
        self._nc = nc
        self._next = next_subject
        self._largest = largest
        # Each request has its own reply subject, so the server's word that one has ended
        # (a status message sent to it) is matched to that request.
        self._inbox = nc.new_inbox()
        self._requests = itertools.count()
        self._sub: Any = None
        self._ready: collections.deque[Delivery] = collections.deque()
        self._credit = 0
        # Requests not known to have ended: reply token -> (when to stop counting it, size).
        self._open: dict[str, tuple[float, int]] = {}
        self._reconnects = 0
        self._arrived = asyncio.Event()
        self._error: str | None = None

    async def start(self) -> None:
        """Subscribe to the inbox the consumer's messages are delivered to."""
        self._reconnects = self._nc.stats["reconnects"]
        self._sub = await self._nc.subscribe(self._inbox + ".*", cb=self._receive)

    @property
    def idle(self) -> bool:
        """Nothing asked for is still to come, and nothing received is left to take."""
        self._prune()
        return not self._ready and self._credit == 0

    def reset(self) -> None:
        """Forget what was asked for and received: the consumer was deleted, and what it
        delivered is delivered again by its successor."""
        self._ready.clear()
        self._open.clear()
        self._credit = 0
        self._error = None

    async def fetch(self, room: int, timeout: float, *, ask: bool = True) -> list[Delivery]:
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

    async def _receive(self, msg: Msg) -> None:
        headers = msg.headers
        if msg.reply:  # a JetStream delivery: it carries its ack subject
            try:
                self._ready.append(Delivery(msg))
            except Exception as exc:  # nothing on this inbox may stop the stage
                log.warning("dropped a message on the pull inbox: %r", exc)
                return
            self._credit = max(0, self._credit - 1)
        elif headers and headers.get("Status", "100") != "100":  # not a heartbeat
            self._ended(msg.subject.rpartition(".")[2], headers)
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


def _stored_seq(subject: str, answer: Msg) -> int:
    """The stream sequence from a publish ack, or the error it reports."""
    if not answer.data and answer.headers and answer.headers.get("Status") == "503":
        raise BusError(  # no responders: no stream listens on the subject
            f"no stream stores {subject!r}: declare the topology (`orchestrator declare`)"
        )
    try:
        reply = orjson.loads(answer.data)
        error = reply.get("error")
        if error:
            if error.get("err_code") == _STORE_FAILED:
                raise Overloaded(subject, error.get("description", ""))
            raise BusError(f"publish to {subject} failed: {error.get('description', error)}")
        return int(reply["seq"])
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        raise BusError(f"publish to {subject}: unreadable ack {answer.data[:200]!r}") from None


# -- configuration mapping ----------------------------------------------------------------

_STREAM_FIELDS = (
    "subjects", "retention", "discard", "max_msgs", "max_bytes", "max_age", "max_msg_size",
    "max_msgs_per_subject", "storage", "num_replicas", "duplicate_window", "allow_msg_counter",
)  # fmt: skip
_CONSUMER_FIELDS = ("filter_subjects", "max_ack_pending", "ack_wait", "max_deliver", "ack_policy")


def _consumer_view(info: api.ConsumerInfo) -> ConsumerView:
    cfg = info.config
    subjects = tuple(cfg.filter_subjects or ([cfg.filter_subject] if cfg.filter_subject else []))
    return ConsumerView(
        name=info.name,
        subjects=subjects,
        created=info.created.timestamp() if info.created else 0.0,
        state=ConsumerState(
            pending=info.num_pending or 0,
            ack_pending=info.num_ack_pending or 0,
            redelivered=info.num_redelivered or 0,
            waiting=info.num_waiting or 0,
            ack_floor=(info.ack_floor.stream_seq or 0) if info.ack_floor else 0,
            delivered=(info.delivered.stream_seq or 0) if info.delivered else 0,
        ),
    )


def _stream_config(spec: StreamSpec) -> api.StreamConfig:
    return api.StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        retention=api.RetentionPolicy(spec.retention),
        discard=api.DiscardPolicy(spec.discard),
        max_msgs=spec.max_msgs,
        max_bytes=spec.max_bytes,
        max_age=spec.max_age,
        max_msg_size=spec.max_msg_size,
        max_msgs_per_subject=spec.max_msgs_per_subject,
        storage=api.StorageType(spec.storage),
        num_replicas=spec.replicas,
        duplicate_window=spec.duplicate_window,
        allow_msg_counter=spec.counter or None,
    )


def _consumer_config(spec: ConsumerSpec) -> api.ConsumerConfig:
    return api.ConsumerConfig(
        durable_name=spec.durable,
        filter_subjects=list(spec.filter_subjects),
        inactive_threshold=spec.inactive_threshold,
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        max_ack_pending=spec.max_ack_pending,
        ack_wait=spec.ack_wait,
        max_deliver=spec.max_deliver,
    )


# Server and client spell some defaults differently.
_SAME = {("num_replicas", None, 1), ("num_replicas", 0, 1), ("allow_msg_counter", False, None)}


def _norm(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(sorted(value))
    if isinstance(value, float):
        return round(value, 6)
    if hasattr(value, "value"):  # enums compare by their wire value
        return value.value
    return value


def _diff(have: Any, want: Any, names: tuple[str, ...]) -> str:
    """Human-readable differences between the server's config and the wanted one."""
    known = {f.name for f in fields(want)}
    out = []
    for name in names:
        if name not in known:
            continue
        a, b = _norm(getattr(have, name, None)), _norm(getattr(want, name, None))
        if a != b and (name, a, b) not in _SAME:
            out.append(f"{name}: {a!r} -> {b!r}")
    return ", ".join(out)


_RETRY_LOG_EVERY = 10.0
"""Seconds between log lines while (re)connecting fails: nats-py retries twice a second."""


class _ConnectionEvents:
    """Logs connection trouble, but not the disconnect that closing a connection causes.

    A failing (re)connect is logged when it starts and then every _RETRY_LOG_EVERY seconds,
    not once per attempt, so a one-shot command waiting 5 s logs one line before its error.
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
