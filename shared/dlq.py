"""Operating the dead-letter stream: list, inspect, replay and purge entries.

Replay and purge are safe to interrupt and run again. Each step is keyed by the entry's
sequence: the republish carries `Nats-Msg-Id: replay:<stream>:<seq>` and the counter
increment `replayed:<stream>:<seq>`, and the entry is deleted only after both are stored.
A re-run within the duplicate window therefore completes what was left and repeats nothing.

Every operation works on the entries that existed when it started: it reads the stream's last
sequence first and stops there. An entry dead-lettered while it runs (a replayed request that
expires or is invalid again, or meets a full stream again) gets a new, higher sequence and is
left for the next run, so an operation always ends and touches each entry at most once.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from shared import deadletter
from shared.deadletter import Entry
from shared.errors import OrchestratorError, Overloaded
from shared.topology import COUNTERS, DLQ, Topology
from shared.transport.api import MessageBus


@dataclass(frozen=True)
class EntryFilter:
    """Which entries an operation applies to; every given field must match."""

    stage: str | None = None
    reason: str | None = None
    session: str | None = None
    request_id: str | None = None
    since: float | None = None
    until: float | None = None

    def matches(self, entry: Entry) -> bool:
        """Whether `entry` passes the filters the subject cannot express."""
        return (
            (self.session is None or entry.session_id == self.session)
            and (self.request_id is None or entry.request_id == self.request_id)
            and (self.since is None or entry.failed_at >= self.since)
            and (self.until is None or entry.failed_at < self.until)
        )


@dataclass
class ReplayReport:
    """What a replay did."""

    matched: int = 0
    """Entries that matched when the replay started (at most `limit`)."""
    replayed: int = 0
    """Entries republished and deleted."""
    failed: list[tuple[int, str]] = field(default_factory=list)
    """(sequence, error) of each entry tried and not replayed; it stays in the stream."""

    @property
    def untried(self) -> int:
        """Matching entries not tried because the replay stopped early (a full stream)."""
        return max(0, self.matched - self.replayed - len(self.failed))


Progress = Callable[[int, int], None]
"""Called with (done, total) as an operation advances."""


class DeadLetterQueue:
    """The dead-letter stream of one pipeline."""

    def __init__(self, bus: MessageBus, topology: Topology) -> None:
        self._bus = bus
        self._topology = topology
        self.stream = self._topology.stream_name(DLQ)
        self._counters = self._topology.stream_name(COUNTERS)

    async def last_seq(self) -> int:
        """The sequence of the last entry ever stored: an operation's end, read at its start."""
        return (await self._bus.admin.stream_state(self.stream)).last_seq

    async def entries(
        self,
        flt: EntryFilter | None = None,
        limit: int | None = None,
        *,
        through: int | None = None,
    ) -> AsyncIterator[Entry]:
        """Matching entries, oldest first, up to sequence `through`.

        `through` defaults to the last sequence when the iteration starts: entries stored
        while it runs are not included.
        """
        flt = flt or EntryFilter()
        if through is None:
            through = await self.last_seq()
        subject = self._topology.dlq_subject(flt.stage or "*", flt.reason or "*")
        seq, found = 1, 0
        while seq <= through and (limit is None or found < limit):
            msg = await self._bus.admin.message_at(self.stream, seq, subject)
            if msg is None or msg.seq > through:
                return
            seq = msg.seq + 1
            entry = Entry.parse(msg.seq, msg.data, msg.headers)
            if flt.matches(entry):
                found += 1
                yield entry

    async def get(self, seq: int) -> Entry | None:
        """The entry with sequence `seq`, or None."""
        if seq < 1:
            return None
        msg = await self._bus.admin.message_at(self.stream, seq, self._topology.dlq_subject())
        if msg is None or msg.seq != seq:
            return None
        return Entry.parse(msg.seq, msg.data, msg.headers)

    async def count(
        self,
        flt: EntryFilter | None = None,
        limit: int | None = None,
        *,
        through: int | None = None,
    ) -> int:
        """How many entries match (up to sequence `through`, by default the last one now)."""
        return sum([1 async for _ in self.entries(flt, limit, through=through)])

    async def replay(
        self,
        flt: EntryFilter | None = None,
        *,
        limit: int | None = None,
        rate: float | None = None,
        dry_run: bool = False,
        progress: Progress | None = None,
        through: int | None = None,
    ) -> ReplayReport:
        """Send matching entries back to the subject they failed on, then delete them
        (`dry_run`: only check each, as `failed` reports).

        Only entries up to sequence `through` (by default the last one when the replay
        starts) are replayed, so an entry that is dead-lettered again during the replay is
        left for another run rather than replayed again. `rate` caps replays per second. A
        full target stream stops the replay (the rest stays in the dead-letter stream); other
        per-entry problems are reported and skipped.
        """
        if through is None:
            through = await self.last_seq()
        report = ReplayReport(matched=await self.count(flt, limit, through=through))
        if dry_run:  # the checks a replay makes before publishing, and nothing else
            async for entry in self.entries(flt, limit, through=through):
                try:
                    self._channel_of(entry)
                except OrchestratorError as exc:
                    report.failed.append((entry.seq, str(exc)))
            return report
        interval = 1.0 / rate if rate else 0.0
        next_at = time.monotonic()
        async for entry in self.entries(flt, limit, through=through):
            if interval:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at = max(next_at + interval, time.monotonic())
            try:
                await self._replay_one(entry)
            except Overloaded as exc:  # the target is full: the rest waits for another run
                report.failed.append((entry.seq, str(exc)))
                break
            except OrchestratorError as exc:
                report.failed.append((entry.seq, str(exc)))
                continue
            report.replayed += 1
            if progress:
                progress(report.replayed, report.matched)
        return report

    async def _replay_one(self, entry: Entry) -> None:
        channel = self._channel_of(entry)
        headers = {deadletter.REPLAY_OF: str(entry.seq)}
        for key in (deadletter.TRACEPARENT, deadletter.TRACESTATE):
            if key in entry.headers:
                headers[key] = entry.headers[key]
        key = f"{self.stream}:{entry.seq}"
        await self._bus.publish(
            entry.subject, entry.payload, msg_id=f"replay:{key}", headers=headers
        )
        counter = self._topology.counter_subject(f"replayed.{channel}")
        await self._bus.increment(counter, 1, msg_id=f"replayed:{key}")
        await self._bus.admin.delete(self.stream, entry.seq)

    def _channel_of(self, entry: Entry) -> str:
        channel = self._topology.channel_of_subject(entry.subject)
        if channel is None:
            raise OrchestratorError(
                f"entry {entry.seq}: original subject {entry.subject!r} is not a channel of "
                "this pipeline (is it the pipeline file the stages run with? --config)"
            )
        return channel

    async def purge(
        self,
        flt: EntryFilter | None = None,
        *,
        limit: int | None = None,
        progress: Progress | None = None,
        through: int | None = None,
    ) -> int:
        """Delete matching entries for good; return how many were deleted.

        Only entries up to sequence `through` (by default the last one when the purge
        starts) are deleted: pass the sequence read when the operator confirmed, so that
        entries stored since are kept.
        """
        if through is None:
            through = await self.last_seq()
        total = await self.count(flt, limit, through=through) if progress else 0
        deleted = 0
        counter = self._topology.counter_subject("purged")
        async for entry in self.entries(flt, limit, through=through):
            # Counted before deleting: a crash in between is made good by a re-run.
            await self._bus.increment(counter, 1, msg_id=f"purged:{self.stream}:{entry.seq}")
            if await self._bus.admin.delete(self.stream, entry.seq):
                deleted += 1
            if progress:
                progress(deleted, total)
        return deleted
