"""Declaring and inspecting streams and consumers over JetStream's management API."""

from dataclasses import fields
from typing import Any

import orjson
from nats.js import api
from nats.js.manager import JetStreamManager

from shared.transport.api import (
    ConsumerSpec,
    ConsumerState,
    ConsumerView,
    StoredMessage,
    StreamSpec,
    StreamState,
)
from shared.transport.translate import change, query


class JetStreamAdmin:
    """Streams and consumers of one connection (`Bus.admin`)."""

    def __init__(self, jsm: JetStreamManager) -> None:
        self._jsm = jsm

    async def ensure_stream(self, spec: StreamSpec) -> str:
        """Create the stream, or bring it in line with `spec`; return what was done."""
        want = _stream_config(spec)
        info = await query(self._jsm.stream_info(spec.name), f"read stream {spec.name}", None)
        if info is None:
            await change(self._jsm.add_stream(want), f"create stream {spec.name}")
            return "created"
        diff = _diff(info.config, want, _STREAM_FIELDS)
        if not diff:
            return "unchanged"
        await change(self._jsm.update_stream(want), f"update stream {spec.name} ({diff})")
        return f"updated ({diff})"

    async def ensure_consumer(self, spec: ConsumerSpec) -> str:
        """Create the durable consumer, or bring it in line with `spec`; return what was done."""
        want = _consumer_config(spec)
        what = f"read consumer {spec.durable}"
        info = await query(self._jsm.consumer_info(spec.stream, spec.durable), what, None)
        if info is None:
            what = f"create consumer {spec.durable} on {spec.stream}"
            await change(self._jsm.add_consumer(spec.stream, want), what)
            return "created"
        diff = _diff(info.config, want, _CONSUMER_FIELDS)
        if not diff:
            return "unchanged"
        what = f"update consumer {spec.durable} on {spec.stream} ({diff})"
        await change(self._jsm.add_consumer(spec.stream, want), what)
        return f"updated ({diff})"

    async def delete_consumer(self, stream: str, name: str) -> bool:
        """Delete a consumer; False if it was already gone. Its un-acked messages are freed."""
        what = f"delete consumer {name} on {stream}"
        return await query(self._jsm.delete_consumer(stream, name), what, False)

    async def consumers(self, stream: str) -> list[ConsumerView]:
        """Every consumer of `stream`, with its subjects and counters; none if no stream."""
        infos = await query(self._jsm.consumers_info(stream), f"list consumers of {stream}", [])
        return [_consumer_view(info) for info in infos]

    async def consumer(self, stream: str, name: str) -> ConsumerView | None:
        """One consumer of `stream`, or None if there is no such consumer."""
        what = f"read consumer {name} on {stream}"
        info = await query(self._jsm.consumer_info(stream, name), what, None)
        return None if info is None else _consumer_view(info)

    async def stream_state(self, stream: str) -> StreamState:
        """How many messages `stream` holds, and the sequence of the last one ever stored."""
        info = await query(self._jsm.stream_info(stream), f"read stream {stream}")
        return StreamState(info.state.messages, info.state.bytes, info.state.last_seq)

    async def last_message(self, stream: str, subject: str) -> StoredMessage | None:
        """The last message stored on `subject`, or None."""
        raw = await query(self._jsm.get_last_msg(stream, subject), f"read {subject}", None)
        if raw is None:
            return None
        return StoredMessage(
            raw.seq or 0, raw.subject or subject, raw.data or b"", raw.headers or {}
        )

    async def message_at(self, stream: str, seq: int, subject: str) -> StoredMessage | None:
        """The first message at or after `seq` whose subject matches `subject`, or None."""
        call = self._jsm.get_msg(stream, seq=seq, subject=subject, next=True)
        raw = await query(call, f"read {stream} at {seq}", None)
        if raw is None:
            return None
        return StoredMessage(raw.seq or seq, raw.subject or "", raw.data or b"", raw.headers or {})

    async def delete(self, stream: str, seq: int) -> bool:
        """Delete message `seq` from `stream`; False when it was already gone."""
        return await query(self._jsm.delete_msg(stream, seq), f"delete {stream} #{seq}", False)

    async def subject_counts(self, stream: str, subject: str) -> dict[str, int]:
        """How many messages `stream` holds per subject matching `subject`."""
        call = self._jsm.stream_info(stream, subjects_filter=subject)
        info = await query(call, f"count subjects of {stream}")
        return dict(info.state.subjects or {})

    async def counter(self, stream: str, subject: str) -> int:
        """The value of the counter on `subject`, 0 if it was never incremented."""
        stored = await self.last_message(stream, subject)
        if stored is None or not stored.data:
            return 0
        return int(orjson.loads(stored.data)["val"])


# -- configuration mapping ----------------------------------------------------------------

_STREAM_FIELDS = (
    "subjects", "retention", "discard", "max_msgs", "max_bytes", "max_age", "max_msg_size",
    "max_msgs_per_subject", "storage", "num_replicas", "duplicate_window", "allow_msg_counter",
    "placement",
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
        placement=api.Placement(tags=list(spec.placement)) if spec.placement else None,
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
    if isinstance(value, api.Placement):  # compared by its tags: none is no placement
        return tuple(sorted(value.tags or ())) or None
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
