"""An in-memory `MessageBus` for unit tests: JetStream as the runtime relies on it, no server.

`MemoryBus()` is a connection to a private in-memory server; `bus.connect()` opens another
connection to the same server, so a test can run several "processes" and kill one by closing
its connection: from then on nothing it sends arrives (no ack, no heartbeat, no publish).

Modelled on nats-server and `shared.transport.Bus`, raising the same errors:

- streams: subjects with `*` and `>` wildcards (a publish is stored by the stream whose
  subjects match it; BusError when none does); `workqueue` retention (an ack deletes the
  message) or `limits`; discard `new` (a full stream refuses the publish: Overloaded) or `old`
  (the oldest messages go); `max_msgs`, `max_bytes`, `max_msg_size`, `max_msgs_per_subject`
  (the subject's oldest goes); the duplicate window (a publish whose `Nats-Msg-Id` was seen
  within it is not stored again and gets the original's sequence); counter streams (a publish
  with `Nats-Incr: +N` stores `{"val": "<total>"}` on its subject). Sequences start at 1 and
  only grow. A message (with headers) over `max_payload` is refused as MessageTooLarge.
- core subscriptions: every publish reaching the server is delivered to each matching
  subscription, whatever its stream does with it (stores, refuses, drops as a duplicate).
- durable pull consumers: deliver-all from the first stored message, filter subjects,
  `max_ack_pending`, `ack_wait` (reset by `in_progress`), `nak` with or without a delay, `term`,
  `max_deliver` (a message delivered that often is not delivered again, and stays stored),
  redeliveries before new messages. Consumers of a work-queue stream may not share a subject
  (SubjectTaken). Deleting a consumer frees what it held: a new consumer on those subjects gets
  the messages as first deliveries, and a puller of the deleted one fails with BusError.
- key-value buckets whose entries expire `ttl` seconds after their last put (checked when
  read); puts and deletes (header `KV-Operation: DEL`) go to core subscribers of
  `$KV.<bucket>.<key>`.

Left out: replicas, storage type, `max_age` and `inactive_threshold` are accepted and ignored;
no clustering, persistence or reconnects; key-value buckets are not streams (admin does not
list them) and an expiry publishes no delete marker; no advisories, no push consumers. A
puller asks for messages only while its `fetch` waits, so between fetches nothing is in
transit to it and it is always `idle` (a `JetStreamPuller` may hold credit for a second).
Timers run on the event loop; closing the last connection cancels them.
"""

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, fields

import orjson

from shared.errors import (
    BusError,
    MessageTooLarge,
    NoSuchStream,
    Overloaded,
    SubjectTaken,
    TopologyError,
)
from shared.transport.api import (
    MSG_ID,
    BucketSpec,
    ConsumerSpec,
    ConsumerState,
    ConsumerView,
    StoredMessage,
    StreamSpec,
    StreamState,
)

MAX_PAYLOAD = 1024 * 1024
"""nats-server's default max_payload: a bigger message (with its headers) is refused."""
INCREMENT = "Nats-Incr"
"""The header a publish to a counter stream carries its increment in (`+N` or `-N`)."""
KV_OPERATION = "KV-Operation"
"""The header marking a key-value delete (`DEL`) on the bucket's subjects."""


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether the literal `subject` matches `pattern` (`*`: one token, `>`: the rest)."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def subjects_overlap(a: str, b: str) -> bool:
    """Whether some literal subject matches both patterns."""
    x, y = a.split("."), b.split(".")
    for s, t in zip(x, y, strict=False):
        if ">" in (s, t):
            return True
        if "*" not in (s, t) and s != t:
            return False
    return len(x) == len(y)


def _limit(value: int) -> int | None:
    """A limit as the server reads it: zero or negative means none."""
    return value if value > 0 else None


def _describe(old: object, new: object, names: tuple[str, ...]) -> str:
    """`name: old -> new` for each field that differs, as JetStreamAdmin reports it."""
    diff = []
    for name in names:
        a, b = getattr(old, name), getattr(new, name)
        if isinstance(a, tuple):
            a, b = tuple(sorted(a)), tuple(sorted(b))
        if a != b:
            diff.append(f"{name}: {a!r} -> {b!r}")
    return ", ".join(diff)


class _Signal:
    """Wakes every task waiting on it; checking a condition and then waiting loses nothing."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Until the next `notify`, at most `timeout` seconds."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                await waiter
        except TimeoutError:
            pass
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)


@dataclass
class _Message:
    """A message as a stream stores it."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]
    size: int

    def stored(self) -> StoredMessage:
        return StoredMessage(self.seq, self.subject, self.data, dict(self.headers))


@dataclass
class _Pending:
    """A message a consumer delivered and nobody has acked."""

    delivered: int
    token: int = 0
    """Which delivery is the latest: a nak or in_progress of an older one is ignored."""
    due: bool = False
    """Queued for redelivery."""
    timer: asyncio.TimerHandle | None = None


class _Stream:
    """A stream: its messages in sequence order, its duplicate ids and its consumers."""

    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        self.messages: dict[int, _Message] = {}  # in sequence order
        self.bytes = 0
        self.last_seq = 0
        self.ids: dict[str, tuple[int, float]] = {}  # msg id -> (seq, when), oldest first
        self.consumers: dict[str, _Consumer] = {}
        self.appended = _Signal()

    def stores(self, subject: str) -> bool:
        return any(subject_matches(p, subject) for p in self.spec.subjects)

    def first(self, seq: int, match: Callable[[str], bool]) -> _Message | None:
        """The first message at or after `seq` whose subject passes `match`."""
        return next((m for m in self.messages.values() if m.seq >= seq and match(m.subject)), None)

    def seen(self, msg_id: str) -> bool:
        """Whether a message with `msg_id` was stored within the duplicate window."""
        self._forget_old_ids()
        return msg_id in self.ids

    def _forget_old_ids(self) -> None:
        now = time.monotonic()
        while self.ids and next(iter(self.ids.values()))[1] < now - self.spec.duplicate_window:
            del self.ids[next(iter(self.ids))]

    def store(self, subject: str, data: bytes, headers: dict[str, str]) -> int:
        spec = self.spec
        self._forget_old_ids()
        msg_id = headers.get(MSG_ID)
        if msg_id and msg_id in self.ids:
            return self.ids[msg_id][0]
        if spec.max_msg_size >= 0 and len(data) > spec.max_msg_size:
            raise BusError(f"publish to {subject} failed: message size exceeds maximum allowed")
        if spec.counter:
            if INCREMENT not in headers:
                raise BusError(f"publish to {subject} failed: message counter increment missing")
            last = self.first_from_end(lambda s: s == subject)
            total = int(orjson.loads(last.data)["val"]) if last else 0
            data = orjson.dumps({"val": str(total + int(headers[INCREMENT]))})
        elif INCREMENT in headers:
            raise BusError(f"publish to {subject} failed: message counters is disabled")
        size = len(subject) + len(data) + 16
        if headers:
            size += 12 + sum(len(k) + len(v) + 4 for k, v in headers.items())
        max_msgs, max_bytes = _limit(spec.max_msgs), _limit(spec.max_bytes)
        if spec.discard == "new":
            if max_msgs is not None and len(self.messages) >= max_msgs:
                raise Overloaded(subject, "maximum messages exceeded")
            if max_bytes is not None and self.bytes + size > max_bytes:
                raise Overloaded(subject, "maximum bytes exceeded")
        self.last_seq += 1
        self.messages[self.last_seq] = _Message(self.last_seq, subject, data, headers, size)
        self.bytes += size
        if msg_id:
            self.ids[msg_id] = (self.last_seq, time.monotonic())
        if (per_subject := _limit(spec.max_msgs_per_subject)) is not None:
            on_subject = [m.seq for m in self.messages.values() if m.subject == subject]
            for seq in on_subject[:-per_subject]:
                self.remove(seq)
        if spec.discard == "old":
            while (max_msgs is not None and len(self.messages) > max_msgs) or (
                max_bytes is not None and self.bytes > max_bytes
            ):
                self.remove(next(iter(self.messages)))
        self.appended.notify()
        for consumer in self.consumers.values():
            consumer.ready.notify()
        return self.last_seq

    def first_from_end(self, match: Callable[[str], bool]) -> _Message | None:
        return next((m for m in reversed(self.messages.values()) if match(m.subject)), None)

    def remove(self, seq: int) -> bool:
        msg = self.messages.pop(seq, None)
        if msg is None:
            return False
        self.bytes -= msg.size
        for consumer in self.consumers.values():
            consumer.forget(seq)
        return True


class _Consumer:
    """A durable consumer: its cursor, what it delivered and nobody acked, its timers."""

    def __init__(self, spec: ConsumerSpec, stream: _Stream) -> None:
        self.spec = spec
        self.stream = stream
        self.created = time.time()
        self.cursor = 0  # stream sequence of the last message delivered for the first time
        self.pending: dict[int, _Pending] = {}
        self.due: deque[int] = deque()  # pending messages to redeliver, in order
        self.exhausted: dict[int, int] = {}  # delivered max_deliver times: seq -> deliveries
        self.tokens = itertools.count(1)
        self.waiting = 0
        self.deleted = False
        self.ready = _Signal()

    def wants(self, subject: str) -> bool:
        filters = self.spec.filter_subjects
        return not filters or any(subject_matches(f, subject) for f in filters)

    def take(self, room: int, conn: "MemoryBus") -> list["MemoryDelivery"]:
        """Up to `room` deliveries available now: redeliveries first, then new messages."""
        out: list[MemoryDelivery] = []
        if self.deleted:
            return out
        while self.due and len(out) < room:
            seq = self.due.popleft()
            pending = self.pending.get(seq)
            if pending is not None and pending.due:
                pending.due = False
                pending.delivered += 1
                out.append(self._deliver(self.stream.messages[seq], pending, conn))
        most = _limit(self.spec.max_ack_pending)
        for msg in self.stream.messages.values():
            if len(out) >= room or (most is not None and len(self.pending) >= most):
                break
            if msg.seq > self.cursor and self.wants(msg.subject):
                self.cursor = msg.seq
                self.pending[msg.seq] = pending = _Pending(delivered=1)
                out.append(self._deliver(msg, pending, conn))
        return out

    def _deliver(self, msg: _Message, pending: _Pending, conn: "MemoryBus") -> "MemoryDelivery":
        pending.token = next(self.tokens)
        self._arm(msg.seq, pending, self.spec.ack_wait)
        return MemoryDelivery(conn, self, msg, pending.delivered, pending.token)

    def _arm(self, seq: int, pending: _Pending, delay: float) -> None:
        if pending.timer is not None:
            pending.timer.cancel()
        loop = asyncio.get_running_loop()
        pending.timer = loop.call_later(delay, self._expire, seq, pending.token)

    def _expire(self, seq: int, token: int) -> None:
        """The ack wait (or nak delay) of delivery `token` of `seq` ran out."""
        pending = self._current(seq, token)
        if pending is None:
            return
        pending.timer = None
        most = _limit(self.spec.max_deliver)
        if most is not None and pending.delivered >= most:
            del self.pending[seq]
            self.exhausted[seq] = pending.delivered
        else:
            pending.due = True
            self.due.append(seq)
        self.ready.notify()

    def _current(self, seq: int, token: int) -> _Pending | None:
        pending = None if self.deleted else self.pending.get(seq)
        if pending is None or pending.token != token or pending.due:
            return None
        return pending

    def ack(self, seq: int) -> None:
        """Settle `seq` for good (ack or term): a work-queue stream deletes it."""
        if self.deleted:
            return
        pending = self.pending.pop(seq, None)
        if pending is None and seq not in self.exhausted:
            return
        self.exhausted.pop(seq, None)
        if pending is not None and pending.timer is not None:
            pending.timer.cancel()
        if self.stream.spec.retention == "workqueue":
            self.stream.remove(seq)
        self.ready.notify()  # room under max_ack_pending

    def nak(self, seq: int, token: int, delay: float | None) -> None:
        pending = self._current(seq, token)
        if pending is None:
            return
        if delay:
            self._arm(seq, pending, delay)
        else:
            if pending.timer is not None:
                pending.timer.cancel()
            self._expire(seq, token)

    def progress(self, seq: int, token: int) -> None:
        pending = self._current(seq, token)
        if pending is not None:
            self._arm(seq, pending, self.spec.ack_wait)

    def forget(self, seq: int) -> None:
        """`seq` left the stream."""
        pending = self.pending.pop(seq, None)
        if pending is not None and pending.timer is not None:
            pending.timer.cancel()
        self.exhausted.pop(seq, None)

    def stop_timers(self) -> None:
        for pending in self.pending.values():
            if pending.timer is not None:
                pending.timer.cancel()
                pending.timer = None

    def delete(self) -> None:
        self.deleted = True
        self.stop_timers()
        self.pending.clear()
        self.due.clear()
        self.ready.notify()

    def view(self) -> ConsumerView:
        unsettled = [*self.pending, *self.exhausted]
        delivered = [*(p.delivered for p in self.pending.values()), *self.exhausted.values()]
        ahead = [m for m in self.stream.messages.values() if m.seq > self.cursor]
        state = ConsumerState(
            pending=sum(1 for m in ahead if self.wants(m.subject)),
            ack_pending=len(self.pending),
            redelivered=sum(1 for n in delivered if n > 1),
            waiting=self.waiting,
            ack_floor=min(unsettled) - 1 if unsettled else self.cursor,
            delivered=self.cursor,
        )
        return ConsumerView(self.spec.durable, self.spec.filter_subjects, self.created, state)


class _Bucket:
    """A key-value bucket: each value with when it expires (time.monotonic)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.entries: dict[str, tuple[bytes, float]] = {}  # key -> (value, expires)

    def live(self, key: str) -> bytes | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del self.entries[key]
            return None
        return entry[0]


class _Server:
    """What nats-server holds: shared by every connection of one family."""

    def __init__(self) -> None:
        self.streams: dict[str, _Stream] = {}
        self.buckets: dict[str, _Bucket] = {}
        self.subscriptions: list[MemorySubscription] = []
        self.connections = 0

    def broadcast(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        for sub in self.subscriptions:
            if subject_matches(sub.subject, subject):
                sub.queue.put_nowait(StoredMessage(0, subject, data, dict(headers)))

    def stream(self, name: str, what: str) -> _Stream:
        found = self.streams.get(name)
        if found is None:
            raise NoSuchStream(f"{what}: stream not found")
        return found

    def shutdown(self) -> None:
        for stream in self.streams.values():
            stream.appended.notify()
            for consumer in stream.consumers.values():
                consumer.stop_timers()
                consumer.ready.notify()


class MemoryDelivery:
    """One message handed to a consumer of a MemoryBus, with the operations that settle it."""

    __slots__ = ("_conn", "_consumer", "_token", "data", "delivered", "headers", "stream_seq",
                 "subject")  # fmt: skip

    def __init__(
        self, conn: "MemoryBus", consumer: _Consumer, msg: _Message, delivered: int, token: int
    ) -> None:
        self._conn = conn
        self._consumer = consumer
        self._token = token
        self.data: bytes = msg.data
        self.subject: str = msg.subject
        self.headers: Mapping[str, str] = dict(msg.headers)
        self.delivered: int = delivered
        self.stream_seq: int = msg.seq

    async def ack(self) -> None:
        """Settle as done; a work-queue stream deletes the message."""
        self._conn.check_open()
        self._consumer.ack(self.stream_seq)

    async def nak(self, delay: float | None = None) -> None:
        """Ask for redelivery, after `delay` seconds when given."""
        self._conn.check_open()
        self._consumer.nak(self.stream_seq, self._token, delay)

    async def term(self) -> None:
        """Stop redelivery for good (like an ack, a work-queue stream deletes the message)."""
        self._conn.check_open()
        self._consumer.ack(self.stream_seq)

    async def in_progress(self) -> None:
        """Reset the ack timer: the work is still going on."""
        self._conn.check_open()
        self._consumer.progress(self.stream_seq, self._token)


class MemoryPuller:
    """A pull from one durable consumer of a MemoryBus, found by name at each fetch."""

    def __init__(self, conn: "MemoryBus", stream: str, durable: str) -> None:
        self._conn = conn
        self._stream = stream
        self._durable = durable
        self._consumer: _Consumer | None = None  # the one pulled from, until it is deleted
        self._closed = False

    @property
    def idle(self) -> bool:
        """Always: messages are handed over inside `fetch` only, never held in between."""
        return True

    @property
    def backlog(self) -> int:
        """Always 0: messages are handed over inside `fetch` only."""
        return 0

    def reset(self) -> None:
        """Forget the consumer pulled from: the next fetch pulls from the one of that name."""
        self._consumer = None

    def missing_since(self) -> float | None:
        """None: nothing is lost between this broker and its puller."""
        return None

    async def fetch(self, room: int, timeout: float, *, ask: bool = True) -> list[MemoryDelivery]:
        """Up to `room` deliveries available now, else the first within `timeout`.

        Without `ask` nothing was asked for, so nothing comes. BusError("consumer deleted")
        when the consumer pulled from was deleted; on a closed connection, nothing comes.
        """
        if not ask or room <= 0:
            return []
        if self._closed or self._conn.closed:
            await asyncio.sleep(timeout)  # a closed connection receives nothing
            return []
        consumer = self._attach()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        consumer.waiting += 1
        try:
            while True:
                got = consumer.take(room, self._conn)
                left = deadline - loop.time()
                if got or left <= 0 or self._conn.closed:
                    return got
                await consumer.ready.wait(left)
                if self._attach() is not consumer:  # reset meanwhile: ask the new one next time
                    return []
        finally:
            consumer.waiting -= 1

    def _attach(self) -> _Consumer:
        if self._consumer is not None and self._consumer.deleted:
            self._consumer = None
            raise BusError("consumer deleted")
        if self._consumer is None:
            stream = self._conn.server.streams.get(self._stream)
            found = stream.consumers.get(self._durable) if stream else None
            if found is None:  # nobody answers the pull request
                raise BusError("pull request failed: 503")
            self._consumer = found
        return self._consumer

    async def close(self) -> None:
        """Stop pulling; what was delivered and not acked is redelivered after ack_wait."""
        self._closed = True


class MemorySubscription:
    """A core subscription: every publish on a matching subject, from now until `close`."""

    def __init__(self, conn: "MemoryBus", subject: str) -> None:
        self.conn = conn
        self.subject = subject
        self.queue: asyncio.Queue[StoredMessage] = asyncio.Queue()

    async def next_message(self, timeout: float) -> StoredMessage | None:
        """The next message, or None after `timeout` seconds."""
        try:
            async with asyncio.timeout(max(timeout, 0.001)):
                return await self.queue.get()
        except TimeoutError:
            return None

    def next_nowait(self) -> StoredMessage | None:
        """A message already received, or None."""
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def close(self) -> None:
        """Stop receiving."""
        with contextlib.suppress(ValueError):
            self.conn.server.subscriptions.remove(self)


class MemoryKeyValue:
    """A key-value bucket of a MemoryBus; entries expire `ttl` seconds after their last put."""

    def __init__(self, conn: "MemoryBus", bucket: str, store: _Bucket) -> None:
        self._conn = conn
        self._store = store
        self.bucket = bucket

    def subject(self, key: str) -> str:
        """The subject a put or delete of `key` is published on (wildcards allowed)."""
        return f"$KV.{self.bucket}.{key}"

    async def put(self, key: str, value: bytes) -> None:
        """Store `value` under `key`."""
        self._conn.check_open()
        expires = time.monotonic() + self._store.ttl if self._store.ttl > 0 else float("inf")
        self._store.entries[key] = (value, expires)
        self._conn.server.broadcast(self.subject(key), value, {})

    async def create(self, key: str, value: bytes) -> bool:
        """Store `value` unless `key` holds a value already; True if stored."""
        self._conn.check_open()
        if self._store.live(key) is not None:
            return False
        await self.put(key, value)
        return True

    async def delete(self, key: str) -> None:
        """Delete `key`; subscribers to its subject see a `KV-Operation: DEL` marker."""
        self._conn.check_open()
        self._store.entries.pop(key, None)
        self._conn.server.broadcast(self.subject(key), b"", {KV_OPERATION: "DEL"})

    async def exists(self, key: str) -> bool:
        """Whether `key` holds a live value."""
        self._conn.check_open()
        return self._store.live(key) is not None

    async def get(self, key: str) -> bytes | None:
        """The live value of `key`, or None."""
        self._conn.check_open()
        return self._store.live(key)

    async def items(self, prefix: str) -> dict[str, bytes]:
        """Every live key starting with `prefix`, with its value."""
        self._conn.check_open()
        keys = [k for k in self._store.entries if k.startswith(prefix)]
        return {k: v for k in keys if (v := self._store.live(k)) is not None}


_STREAM_FIELDS = tuple(f.name for f in fields(StreamSpec) if f.name != "name")
_CONSUMER_FIELDS = ("filter_subjects", "max_ack_pending", "ack_wait", "max_deliver")


class MemoryAdmin:
    """Declaring and inspecting the streams and consumers of a MemoryBus (`bus.admin`)."""

    def __init__(self, conn: "MemoryBus") -> None:
        self._conn = conn

    def _server(self) -> _Server:
        self._conn.check_open()
        return self._conn.server

    async def ensure_stream(self, spec: StreamSpec) -> str:
        """Create the stream or bring it in line with `spec`; say what was done."""
        server = self._server()
        for other in server.streams.values():
            if other.spec.name != spec.name and any(
                subjects_overlap(a, b) for a in spec.subjects for b in other.spec.subjects
            ):
                raise TopologyError(f"cannot create stream {spec.name}: subjects overlap with "
                                    f"stream {other.spec.name}")  # fmt: skip
        stream = server.streams.get(spec.name)
        if stream is None:
            server.streams[spec.name] = _Stream(spec)
            return "created"
        diff = _describe(stream.spec, spec, _STREAM_FIELDS)
        if not diff:
            return "unchanged"
        if (stream.spec.retention, stream.spec.storage) != (spec.retention, spec.storage):
            raise TopologyError(f"cannot update stream {spec.name} ({diff}): retention and "
                                "storage cannot change")  # fmt: skip
        stream.spec = spec
        return f"updated ({diff})"

    async def ensure_consumer(self, spec: ConsumerSpec) -> str:
        """Create the consumer or bring it in line with `spec`; say what was done."""
        stream = self._server().streams.get(spec.stream)
        existing = stream.consumers.get(spec.durable) if stream else None
        what = f"{'update' if existing else 'create'} consumer {spec.durable} on {spec.stream}"
        if stream is None:
            raise TopologyError(f"cannot {what}: stream not found")
        for subject in spec.filter_subjects:
            if not any(subjects_overlap(subject, s) for s in stream.spec.subjects):
                raise TopologyError(f"cannot {what}: filter subject {subject!r} is not stored "
                                    "by the stream")  # fmt: skip
        if stream.spec.retention == "workqueue":
            mine = spec.filter_subjects or (">",)
            for other in stream.consumers.values():
                theirs = other.spec.filter_subjects or (">",)
                if other.spec.durable != spec.durable and any(
                    subjects_overlap(a, b) for a in mine for b in theirs
                ):
                    raise SubjectTaken(
                        f"cannot {what}: filtered consumer not unique on workqueue stream"
                    )
        if existing is None:
            stream.consumers[spec.durable] = _Consumer(spec, stream)
            return "created"
        diff = _describe(existing.spec, spec, _CONSUMER_FIELDS)
        existing.spec = spec
        existing.ready.notify()
        return f"updated ({diff})" if diff else "unchanged"

    async def delete_consumer(self, stream: str, name: str) -> bool:
        """Delete a consumer; False if it was already gone. Its un-acked messages are freed."""
        found = self._server().streams.get(stream)
        consumer = found.consumers.pop(name, None) if found else None
        if consumer is None:
            return False
        consumer.delete()
        return True

    async def consumers(self, stream: str) -> list[ConsumerView]:
        """Every consumer of `stream`; none if there is no such stream."""
        found = self._server().streams.get(stream)
        return [c.view() for c in found.consumers.values()] if found else []

    async def consumer(self, stream: str, name: str) -> ConsumerView | None:
        """One consumer of `stream`, or None."""
        found = self._server().streams.get(stream)
        consumer = found.consumers.get(name) if found else None
        return consumer.view() if consumer else None

    async def stream_state(self, stream: str) -> StreamState:
        """How many messages `stream` holds, and the sequence of the last one ever stored."""
        found = self._server().stream(stream, f"read stream {stream}")
        return StreamState(len(found.messages), found.bytes, found.last_seq)

    async def last_message(self, stream: str, subject: str) -> StoredMessage | None:
        """The last message stored on `subject`, or None."""
        found = self._server().streams.get(stream)
        msg = found.first_from_end(lambda s: subject_matches(subject, s)) if found else None
        return msg.stored() if msg else None

    async def message_at(self, stream: str, seq: int, subject: str) -> StoredMessage | None:
        """The first message at or after `seq` whose subject matches `subject`, or None."""
        found = self._server().streams.get(stream)
        msg = found.first(seq, lambda s: subject_matches(subject, s)) if found else None
        return msg.stored() if msg else None

    async def delete(self, stream: str, seq: int) -> bool:
        """Delete message `seq` from `stream`; False when it was already gone."""
        found = self._server().streams.get(stream)
        return found.remove(seq) if found else False

    async def subject_counts(self, stream: str, subject: str) -> dict[str, int]:
        """How many messages `stream` holds per subject matching `subject`."""
        found = self._server().stream(stream, f"count subjects of {stream}")
        counts: dict[str, int] = {}
        for msg in found.messages.values():
            if subject_matches(subject, msg.subject):
                counts[msg.subject] = counts.get(msg.subject, 0) + 1
        return counts

    async def counter(self, stream: str, subject: str) -> int:
        """The value of the counter on `subject` (a counter stream); 0 if never incremented."""
        stored = await self.last_message(stream, subject)
        if stored is None or not stored.data:
            return 0
        return int(orjson.loads(stored.data)["val"])


class MemoryBus:
    """A connection to an in-memory JetStream server: a `MessageBus` for unit tests."""

    def __init__(self, *, max_payload: int = MAX_PAYLOAD, _server: _Server | None = None) -> None:
        """A connection to a new server (or, through `connect`, to `_server`)."""
        self.server = _server or _Server()
        self.server.connections += 1
        self.max_payload = max_payload
        self.closed = False
        self.admin = MemoryAdmin(self)
        """Declaring and inspecting streams and consumers."""

    @property
    def connected(self) -> bool:
        """Whether the connection is open (an in-memory one never drops)."""
        return not self.closed

    async def flush(self) -> None:
        """Nothing to wait for: a publish reaches the subscriptions' queues at once."""

    def connect(self) -> "MemoryBus":
        """Another connection to the same server (another process, as the server sees it)."""
        self.check_open()
        return MemoryBus(max_payload=self.max_payload, _server=self.server)

    def check_open(self) -> None:
        """BusError if this connection is closed."""
        if self.closed:
            raise BusError("connection closed")

    async def __aenter__(self) -> "MemoryBus":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def publish(
        self, subject: str, data: bytes, *, msg_id: str, headers: Mapping[str, str] | None = None
    ) -> int:
        """Store a message and return its stream sequence (Overloaded when the stream is full).

        A duplicate of a message id seen within the stream's duplicate window is not stored
        again: its original's sequence is returned.
        """
        return (await self._publish(subject, data, msg_id, headers))[0]

    async def publish_once(
        self, subject: str, data: bytes, *, msg_id: str, headers: Mapping[str, str] | None = None
    ) -> bool:
        """As `publish`; True if stored now, False if `msg_id` was stored before (within the
        stream's duplicate window)."""
        return not (await self._publish(subject, data, msg_id, headers))[1]

    async def _publish(
        self, subject: str, data: bytes, msg_id: str, headers: Mapping[str, str] | None
    ) -> tuple[int, bool]:
        self.check_open()
        hdrs = {MSG_ID: msg_id, **(headers or {})}
        size = len(data) + sum(len(k) + len(v) + 4 for k, v in hdrs.items()) + 12
        if size > self.max_payload:
            raise MessageTooLarge(f"{size} bytes with headers, over the server's max_payload of "
                                  f"{self.max_payload}, for {subject}")  # fmt: skip
        self.server.broadcast(subject, data, hdrs)
        stream = next((s for s in self.server.streams.values() if s.stores(subject)), None)
        if stream is None:
            raise NoSuchStream(
                f"no stream stores {subject!r}: declare the topology (`orchestrator declare`)"
            )
        duplicate = stream.seen(msg_id)
        seq = stream.store(subject, data, hdrs)
        await asyncio.sleep(0)  # the store's ack comes back after the message is stored
        return seq, duplicate

    async def emit(
        self, subject: str, data: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        """Publish without waiting for a store's ack: a stream on the subject stores it, a
        full one drops it."""
        self.check_open()
        hdrs = dict(headers or {})
        self.server.broadcast(subject, data, hdrs)
        stream = next((s for s in self.server.streams.values() if s.stores(subject)), None)
        if stream is not None:
            with contextlib.suppress(BusError):  # Overloaded too: nobody hears of it
                stream.store(subject, data, hdrs)

    async def increment(self, subject: str, by: int, *, msg_id: str) -> None:
        """Add `by` to the counter on `subject`; once per `msg_id`."""
        await self.publish(subject, b"", msg_id=msg_id, headers={INCREMENT: f"{by:+d}"})

    async def pull(self, spec: ConsumerSpec, largest: int = 64) -> MemoryPuller:
        """A pull from the durable consumer of `spec` (`largest` is accepted and ignored)."""
        self.check_open()
        return MemoryPuller(self, spec.stream, spec.durable)

    async def key_value(self, spec: BucketSpec, *, adjust: bool = True) -> MemoryKeyValue:
        """Create (or bind to, keeping its ttl) the bucket of `spec` (one server: replicas and
        placement do not apply)."""
        self.check_open()
        store = self.server.buckets.setdefault(spec.name, _Bucket(spec.ttl))
        return MemoryKeyValue(self, spec.name, store)

    async def subscribe(self, subject: str) -> MemorySubscription:
        """A core subscription to `subject`."""
        self.check_open()
        sub = MemorySubscription(self, subject)
        self.server.subscriptions.append(sub)
        return sub

    def watch(self, subject: str) -> AsyncIterator[StoredMessage]:
        """Every stored message on `subject` from the start, then new ones as they come."""
        return self._watch(subject)

    async def _watch(self, subject: str) -> AsyncIterator[StoredMessage]:
        self.check_open()
        streams = self.server.streams.values()
        stream = next(
            (s for s in streams if any(subjects_overlap(subject, p) for p in s.spec.subjects)),
            None,
        )
        if stream is None:
            raise BusError(f"watch {subject}: no stream matches the subject")
        seq = 1
        while True:
            self.check_open()
            msg = stream.first(seq, lambda s: subject_matches(subject, s))
            if msg is None:
                await stream.appended.wait(1.0)
                continue
            seq = msg.seq + 1
            yield msg.stored()

    async def close(self) -> None:
        """Close: subscriptions end, and nothing more from this connection reaches the server.

        Closing the last connection of a server cancels its timers (ack waits, nak delays).
        """
        if self.closed:
            return
        self.closed = True
        server = self.server
        server.subscriptions = [s for s in server.subscriptions if s.conn is not self]
        server.connections -= 1
        if server.connections == 0:
            server.shutdown()
