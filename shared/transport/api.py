"""The transport's vocabulary: plain data and the interfaces above it. Imports nothing.

Everything above the transport speaks these types: `StreamSpec` and `ConsumerSpec` to declare,
`Delivery` for a received message, `MessageBus` for a connection. Two implementations exist:
`shared.transport.Bus` on NATS JetStream, and `shared.transport.memory.MemoryBus` in memory,
for unit tests that need no server.
"""

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

MSG_ID = "Nats-Msg-Id"
VOID = "Orch-Void"
"""Header of an empty message standing in a channel for an output that will never come (its
value: the stage that dead-lettered the request): the receiving stage acks and skips it."""
"""The header JetStream deduplicates publishes by, within a stream's duplicate window."""


@dataclass(frozen=True)
class StreamSpec:
    """The configuration a stream must have; compared field by field with the server's."""

    name: str
    subjects: tuple[str, ...]
    retention: Literal["workqueue", "limits"]
    discard: Literal["new", "old"]
    max_msgs: int
    max_bytes: int
    max_age: float
    max_msg_size: int
    max_msgs_per_subject: int
    storage: Literal["file", "memory"]
    replicas: int
    duplicate_window: float
    placement: tuple[str, ...] = ()
    """Server tags its replicas must be placed on (applied when it is created)."""
    counter: bool = False
    """A counter stream: publishes with `Nats-Incr` add to the subject's value."""


@dataclass(frozen=True)
class BucketSpec:
    """A key-value bucket whose entries expire `ttl` seconds after their last put."""

    name: str
    ttl: float
    storage: Literal["file", "memory"] = "file"
    replicas: int = 1
    placement: tuple[str, ...] = ()
    """Server tags its replicas must be placed on."""


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer on some subjects of one stream."""

    stream: str
    durable: str
    filter_subjects: tuple[str, ...]
    max_ack_pending: int
    ack_wait: float
    max_deliver: int
    inactive_threshold: float | None = None
    """Seconds without a pull after which the server removes the consumer."""


@dataclass(frozen=True)
class StoredMessage:
    """A message read back from a stream by sequence or subject (seq 0: not from a stream)."""

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


class Delivery(Protocol):
    """One message handed to a consumer, with the operations that settle it."""

    data: bytes
    subject: str
    headers: Mapping[str, str]
    delivered: int
    """How many times this consumer has delivered the message, this time included."""
    stream_seq: int

    async def ack(self) -> None:
        """Settle as done; a work-queue stream deletes the message."""
        ...

    async def nak(self, delay: float | None = None) -> None:
        """Ask for redelivery, after `delay` seconds when given."""
        ...

    async def term(self) -> None:
        """Stop redelivery for good."""
        ...

    async def in_progress(self) -> None:
        """Reset the ack timer: the work is still going on."""
        ...


class Puller(Protocol):
    """A continuous pull from one durable consumer, bounded by the room its caller gives."""

    @property
    def idle(self) -> bool:
        """Nothing asked for is still to come, and nothing received is left to take."""
        ...

    @property
    def backlog(self) -> int:
        """Deliveries received and not yet taken by `fetch`."""
        ...

    def reset(self) -> None:
        """Forget what was asked for and received (the consumer was deleted)."""
        ...

    def missing_since(self) -> float | None:
        """Since when (time.monotonic) a delivery the server sent has been missing here,
        lost on the way; None when none is."""
        ...

    async def fetch(self, room: int, timeout: float, *, ask: bool = True) -> list[Delivery]:
        """Up to `room` messages: those received, else the first within `timeout`."""
        ...

    async def close(self) -> None:
        """Stop pulling."""
        ...


class Subscription(Protocol):
    """A core (not persisted) subscription, read with timeouts."""

    async def next_message(self, timeout: float) -> StoredMessage | None:
        """The next message, or None after `timeout` seconds."""
        ...

    def next_nowait(self) -> StoredMessage | None:
        """A message already received, or None."""
        ...

    async def close(self) -> None:
        """Stop receiving."""
        ...


class KeyValue(Protocol):
    """A key-value bucket whose entries expire a fixed time after their last put."""

    bucket: str

    def subject(self, key: str) -> str:
        """The subject a put or delete of `key` is published on (wildcards allowed)."""
        ...

    async def put(self, key: str, value: bytes) -> None:
        """Store `value` under `key`."""
        ...

    async def create(self, key: str, value: bytes) -> bool:
        """Store `value` unless `key` holds a value already; True if stored."""
        ...

    async def delete(self, key: str) -> None:
        """Delete `key` (subscribers to its subject see a delete marker)."""
        ...

    async def exists(self, key: str) -> bool:
        """Whether `key` holds a live value."""
        ...

    async def get(self, key: str) -> bytes | None:
        """The live value of `key`, or None."""
        ...

    async def items(self, prefix: str) -> dict[str, bytes]:
        """Every live key starting with `prefix`, with its value."""
        ...


class Admin(Protocol):
    """Declaring and inspecting streams and consumers."""

    async def ensure_stream(self, spec: StreamSpec) -> str:
        """Create the stream or bring it in line with `spec`; say what was done."""
        ...

    async def ensure_consumer(self, spec: ConsumerSpec) -> str:
        """Create the consumer or bring it in line with `spec`; say what was done."""
        ...

    async def delete_consumer(self, stream: str, name: str) -> bool:
        """Delete a consumer; False if it was already gone."""
        ...

    async def consumers(self, stream: str) -> list[ConsumerView]:
        """Every consumer of `stream`; none if there is no such stream."""
        ...

    async def consumer(self, stream: str, name: str) -> ConsumerView | None:
        """One consumer of `stream`, or None."""
        ...

    async def stream_state(self, stream: str) -> StreamState:
        """How many messages `stream` holds, and the sequence of the last one ever stored."""
        ...

    async def last_message(self, stream: str, subject: str) -> StoredMessage | None:
        """The last message stored on `subject`, or None."""
        ...

    async def message_at(self, stream: str, seq: int, subject: str) -> StoredMessage | None:
        """The first message at or after `seq` whose subject matches `subject`, or None."""
        ...

    async def delete(self, stream: str, seq: int) -> bool:
        """Delete message `seq` from `stream`; False when it was already gone."""
        ...

    async def subject_counts(self, stream: str, subject: str) -> dict[str, int]:
        """How many messages `stream` holds per subject matching `subject`."""
        ...

    async def counter(self, stream: str, subject: str) -> int:
        """The value of the counter on `subject` (a counter stream); 0 if never incremented."""
        ...


class MessageBus(Protocol):
    """A connection to the broker: publish, pull, key-value, subscriptions and admin."""

    admin: Admin

    @property
    def max_payload(self) -> int:
        """The largest message (with its headers) the server accepts."""
        ...

    @property
    def connected(self) -> bool:
        """Whether the connection is up now (False while it reconnects, and once closed)."""
        ...

    async def flush(self) -> None:
        """A round trip to the server: once it returns, what the server sent before is in
        the subscriptions' queues. Never raises (a connection in trouble just returns)."""
        ...

    async def publish(
        self, subject: str, data: bytes, *, msg_id: str, headers: Mapping[str, str] | None = None
    ) -> int:
        """Store a message and return its stream sequence (Overloaded when the stream is full)."""
        ...

    async def publish_once(
        self, subject: str, data: bytes, *, msg_id: str, headers: Mapping[str, str] | None = None
    ) -> bool:
        """As `publish`; True if stored now, False if a message with `msg_id` was stored
        before, within the stream's duplicate window."""
        ...

    async def increment(self, subject: str, by: int, *, msg_id: str) -> None:
        """Add `by` to the counter on `subject`; once per `msg_id`."""
        ...

    async def emit(
        self, subject: str, data: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        """Publish without waiting for a store's ack: for what may be lost (progress)."""
        ...

    async def pull(self, spec: ConsumerSpec, largest: int = 64) -> Puller:
        """A continuous pull from the durable consumer of `spec`."""
        ...

    async def key_value(self, spec: BucketSpec, *, adjust: bool = True) -> KeyValue:
        """Create (or bind to) the bucket of `spec`; with `adjust`, an existing one is brought
        to its replicas and placement."""
        ...

    async def subscribe(self, subject: str) -> Subscription:
        """A core subscription to `subject`."""
        ...

    def watch(self, subject: str) -> AsyncIterator[StoredMessage]:
        """Every stored message on `subject` from the start, then new ones as they come."""
        ...

    async def close(self) -> None:
        """Flush and close."""
        ...
