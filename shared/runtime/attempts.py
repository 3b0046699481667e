"""Attempt counts that outlive consumers, so a message that kills its stage is dead-lettered.

The server counts deliveries per consumer, and an instance's consumer does not outlive the
instance (nor a change of its partitions). A message whose handling crashes the process would
come back to each new consumer as a first delivery, and crash every instance in turn, forever.

So the messages a consumer holds un-acked when it is deleted are recorded in the key-value
bucket `<STREAM_PREFIX>_ATTEMPTS`, key `<stage>.<stream sequence>`. A record keeps two counts:

- `failures`: attempts that ended in an error and a retry (the handler raised, timed out);
- `losses`: attempts cut off because the consumer went away while they were under way (the
  instance died, or was judged dead): the ones that may have killed the process.

and the message's `Nats-Msg-Id`, so that a record left over from a purged stream never applies
to a new message that reuses the sequence. A record written before an attempt is marked open
and rewritten closed when the attempt fails cleanly; an open record found by the next owner
is a loss. Whoever deletes a dead instance's consumer records each message it held without
a record as open (it may have been under way); an instance deleting its own consumer, with
nothing under way, records them as one closed failure (they were waiting for a retry).

Only messages with a record ("suspects") cost anything; for every other message the check is
a dictionary lookup.

The same bucket keeps each dead-letter decision while it is carried out, under
`=<stage>.<stream sequence>` (no stage name has `=`): written before the entry is stored,
deleted after the input is acked. A message redelivered after a crash in between finds it and
is dead-lettered the same way again (the entry and the outcome are stored once, by message
id), instead of being handled afresh and perhaps completed: one outcome per request.
"""

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from shared.errors import BusError
from shared.graph import Stage
from shared.topology import Topology
from shared.transport.api import MSG_ID, ConsumerView, KeyValue, MessageBus

log = logging.getLogger(__name__)

RECORD_TTL = 7 * 24 * 3600.0
"""How long a record outlives its last write: a safety net for records of purged messages."""


@dataclass(frozen=True)
class Prior:
    """What a message went through under earlier consumers."""

    failures: int
    """Attempts that failed cleanly and were retried."""
    losses: int
    """Attempts cut off by the loss of the consumer (possibly crashes)."""


class AttemptLog:
    """The attempt records of one stage's input stream, as one instance sees them."""

    def __init__(self, bus: MessageBus, topology: Topology, stage: Stage) -> None:
        self._bus = bus
        self._spec = topology.bucket(topology.attempts_bucket(), RECORD_TTL)
        self._stream = topology.stream_name(stage.channel)
        self._prefix = f"{stage.name}."
        self._kv: KeyValue | None = None
        self._prior: dict[int, tuple[Prior, str]] = {}
        # Messages of this instance's consumer waiting for a retry, by stream sequence: their
        # id and the attempts that failed so far, for when the consumer is recreated.
        self._retrying: dict[int, tuple[str, int]] = {}

    async def open(self) -> None:
        """Create (or bind to) the bucket."""
        self._kv = await self._bus.key_value(self._spec)

    def prior(self, seq: int, headers: Mapping[str, str]) -> Prior | None:
        """What the message at `seq` went through before the current consumer, if anything."""
        found = self._prior.get(seq)
        if found is None or found[1] != headers.get(MSG_ID, ""):
            return None
        return found[0]

    async def load(self) -> None:
        """Read this stage's records: call whenever the instance's consumer is created."""
        prior: dict[int, tuple[Prior, str]] = {}
        for key, value in (await self._store().items(self._prefix)).items():
            try:
                r = orjson.loads(value)
                losses = int(r["l"]) + (1 if r["open"] else 0)  # open: cut off mid-attempt
                seq = int(key.removeprefix(self._prefix))
                prior[seq] = (Prior(int(r["f"]), losses), str(r["id"]))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("ignoring malformed attempt record %s=%r", key, value)
        self._prior = prior

    async def started(
        self, seq: int, headers: Mapping[str, str], prior: Prior, failures: int
    ) -> None:
        """Record, before it begins, that an attempt is under way (after `failures`)."""
        await self._store().put(self._key(seq), _record(headers, failures, prior.losses, True))

    async def failed(
        self, seq: int, headers: Mapping[str, str], prior: Prior, failures: int
    ) -> None:
        """Record that the attempt ended in a clean failure; `failures` now counts it."""
        await self._store().put(self._key(seq), _record(headers, failures, prior.losses, False))

    async def settled(self, seq: int) -> None:
        """Forget `seq`: its message was acked or dead-lettered. Best effort."""
        if self._prior.pop(seq, None) is None:
            return
        try:
            await self._store().delete(self._key(seq))
        except BusError as exc:  # the record expires by itself; a stale one only costs a lookup
            log.debug("could not delete attempt record %s: %s", seq, exc)

    async def deciding(self, seq: int, headers: Mapping[str, str], reason: str, error: str) -> int:
        """Record, before it is carried out, that the message at `seq` is dead-lettered with
        `reason` and `error`; returns 0."""
        decision = {"id": headers.get(MSG_ID, ""), "reason": reason, "error": error}
        await self._store().put(self._decision_key(seq), orjson.dumps(decision))
        return 0

    async def decided(self, seq: int, headers: Mapping[str, str]) -> tuple[str, str] | None:
        """The reason and error the message at `seq` was being dead-lettered with, if a
        decision for it (the same message, by its id) is on record."""
        raw = await self._store().get(self._decision_key(seq))
        if raw is None:
            return None
        try:
            found = orjson.loads(raw)
            if found["id"] != headers.get(MSG_ID, ""):
                return None  # a record left over from a purged stream's message
            return str(found["reason"]), str(found["error"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("ignoring malformed decision %s=%r", self._decision_key(seq), raw)
            return None

    async def carried_out(self, seq: int) -> None:
        """Forget the decision on `seq`: its message is acked. Best effort."""
        try:
            await self._store().delete(self._decision_key(seq))
        except BusError as exc:  # it expires by itself; only a redelivery would read it
            log.debug("could not delete decision %s: %s", seq, exc)

    def retrying(self, seq: int, headers: Mapping[str, str], failures: int) -> None:
        """Note that the message at `seq` failed `failures` attempts and waits for a retry."""
        self._retrying[seq] = (headers.get(MSG_ID, ""), failures)

    def done(self, seq: int) -> None:
        """Forget what `retrying` noted of `seq`: it was acked or dead-lettered."""
        self._retrying.pop(seq, None)

    async def record_unsettled(self, consumer: ConsumerView, *, under_way: bool) -> int:
        """Record each message `consumer` holds un-acked and has no record yet.

        `under_way`: the consumer's instance may have been handling them (it is dead), so
        each counts as a loss; otherwise each waits for a retry and counts the attempts this
        instance saw fail (one, for a message it knows nothing of). Call before deleting the
        consumer; returns how many records were created.
        """
        last, floor = consumer.state.delivered, consumer.state.ack_floor
        created = 0
        # On a work-queue stream every message still stored between the ack floor and the
        # last delivery, on the consumer's subjects, was delivered to it and not acked.
        for subject in consumer.subjects:
            seq = floor + 1
            while seq <= last:
                msg = await self._bus.admin.message_at(self._stream, seq, subject)
                if msg is None or msg.seq > last:
                    break
                failures = 0 if under_way else self._failures(msg.seq, msg.headers)
                record = _record(msg.headers, failures, 0, under_way)
                if await self._store().create(self._key(msg.seq), record):
                    created += 1
                seq = msg.seq + 1
        if created:
            log.info("recorded %d unsettled messages of %s", created, consumer.name)
        return created

    def _failures(self, seq: int, headers: Mapping[str, str]) -> int:
        noted = self._retrying.pop(seq, None)
        if noted is None or noted[0] != headers.get(MSG_ID, ""):
            return 1
        return noted[1]

    def _key(self, seq: int) -> str:
        return f"{self._prefix}{seq}"

    def _decision_key(self, seq: int) -> str:
        return f"={self._prefix}{seq}"

    def _store(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("AttemptLog.open() was not called")
        return self._kv


def _record(headers: Mapping[str, str], failures: int, losses: int, under_way: bool) -> bytes:
    return orjson.dumps(
        {"id": headers.get(MSG_ID, ""), "f": failures, "l": losses, "open": under_way}
    )
