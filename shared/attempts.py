"""Attempt counts that outlive consumers, so a message that kills its stage is dead-lettered.

The server counts deliveries per consumer, and an instance's consumer does not outlive the
instance (nor a change of its partitions). A message whose handling crashes the process would
come back to each new consumer as a first delivery, and crash every instance in turn, forever.

So the messages a consumer held when it went away are recorded in the key-value bucket
`<STREAM_PREFIX>_ATTEMPTS`, key `<stage>.<stream sequence>`, value the number of attempts
they have had and the message's `Nats-Msg-Id` (so that a record left over from a purged
stream never applies to a new message that reuses the sequence).

Whoever removes a consumer records each message it was given and never settled (on a
work-queue stream: every message still stored between its ack floor and its last delivery)
with one attempt, unless the message has a record already. An instance reads the records of
its stage when it creates its consumer; from then on, before each attempt at such a "suspect"
it writes the attempt's number, so a crash during the attempt is counted even though nobody
sees it happen. A record is deleted when its message is settled.

Only suspects cost anything: for every other message the check is a dictionary lookup.
"""

import logging
from collections.abc import Mapping

import orjson

from shared.bus import MSG_ID, Bus, ConsumerView, KeyValueStore
from shared.errors import BusError
from shared.settings import Settings
from shared.stage import StageSpec
from shared.topology import Topology

log = logging.getLogger(__name__)

RECORD_TTL = 7 * 24 * 3600.0
"""How long a record outlives its last write: a safety net for records of purged messages."""


class AttemptLog:
    """The attempt records of one stage's input stream, as one instance sees them."""

    def __init__(self, bus: Bus, settings: Settings, spec: StageSpec) -> None:
        topology = Topology(settings)
        self._bus = bus
        self._settings = settings
        self._bucket = topology.attempts_bucket()
        self._stream = topology.stream_name(spec.input)
        self._prefix = f"{spec.name}."
        self._kv: KeyValueStore | None = None
        self._prior: dict[int, tuple[int, str]] = {}

    async def open(self) -> None:
        """Create (or bind to) the bucket."""
        self._kv = await self._bus.key_value(
            self._bucket, ttl=RECORD_TTL, storage=self._settings.storage
        )

    def prior(self, seq: int, headers: Mapping[str, str]) -> int:
        """Attempts the message at `seq` had before the current consumer was created."""
        record = self._prior.get(seq)
        if record is None or record[1] != headers.get(MSG_ID, ""):
            return 0
        return record[0]

    async def load(self) -> None:
        """Read this stage's records: call whenever the instance's consumer is created."""
        prior: dict[int, tuple[int, str]] = {}
        for key, value in (await self._store().items(self._prefix)).items():
            try:
                record = orjson.loads(value)
                prior[int(key.removeprefix(self._prefix))] = (int(record["n"]), str(record["id"]))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("ignoring malformed attempt record %s=%r", key, value)
        self._prior = prior

    async def started(self, seq: int, headers: Mapping[str, str], attempt: int) -> None:
        """Record, before it begins, that attempt number `attempt` at `seq` is under way."""
        await self._store().put(self._key(seq), _record(attempt, headers))

    async def settled(self, seq: int) -> None:
        """Forget `seq`: its message was acked or dead-lettered. Best effort."""
        if self._prior.pop(seq, None) is None:
            return
        try:
            await self._store().delete(self._key(seq))
        except BusError as exc:  # the record expires by itself; a stale one only costs a lookup
            log.debug("could not delete attempt record %s: %s", seq, exc)

    async def record_unsettled(self, consumer: ConsumerView) -> int:
        """Give each message `consumer` holds un-acked one attempt, unless already recorded.

        Call before deleting the consumer; returns how many records were created.
        """
        last, floor = consumer.state.delivered, consumer.state.ack_floor
        created = 0
        for subject in consumer.subjects:
            seq = floor + 1
            while seq <= last:
                msg = await self._bus.message_at(self._stream, seq, subject)
                if msg is None or msg.seq > last:
                    break
                if await self._store().create(self._key(msg.seq), _record(1, msg.headers)):
                    created += 1
                seq = msg.seq + 1
        if created:
            log.info("recorded an attempt for %d unsettled messages of %s", created,
                     consumer.name)  # fmt: skip
        return created

    def _key(self, seq: int) -> str:
        return f"{self._prefix}{seq}"

    def _store(self) -> KeyValueStore:
        if self._kv is None:
            raise RuntimeError("AttemptLog.open() was not called")
        return self._kv


def _record(attempts: int, headers: Mapping[str, str]) -> bytes:
    return orjson.dumps({"n": attempts, "id": headers.get(MSG_ID, "")})
