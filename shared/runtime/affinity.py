"""Session affinity: the live instances of a stage divide its partitions among themselves.

Membership lives in NATS: each instance puts `<stage>.<instance>` (with the partitions it
holds) into the key-value bucket `<STREAM_PREFIX>_MEMBERS` every `heartbeat` seconds (the
bucket's TTL removes what stops being refreshed) and follows the others' puts and deletes on
the bucket's subjects. From that shared state every instance computes the same assignment
(shared.assignment.rebalance), which moves only the partitions that must move.

Ownership is enforced by the server: an instance reads through its own durable consumer whose
`filter_subjects` are its partitions, and a work-queue stream refuses two consumers with
overlapping subjects. Every change waits until the instance has finished what it holds (the
runtime stops pulling), so no message is handled by two owners. Partitions are released and
acquired by recreating the consumer: one that gains a subject would skip that subject's
messages behind its cursor, and one narrowed in place would still redeliver messages of
partitions that have a new owner, while a new one on a work-queue stream is delivered
exactly the messages nobody has acked.

An instance taking over from one that fell silent for `failover_after` deletes the silent
one's consumer, which frees its un-acked messages at once. A stopping instance deletes its
own consumer and key, so the others take over without waiting. Before any consumer is
deleted, the messages it holds un-acked are recorded in the attempt log (shared.attempts), so
that their attempts keep counting under the next owner.
"""

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable

import orjson

from shared.assignment import rebalance
from shared.cancel import cancel_and_wait
from shared.errors import BusError, ConfigError, SubjectTaken
from shared.graph import Stage
from shared.runtime.attempts import AttemptLog
from shared.settings import Settings
from shared.topology import Topology
from shared.transport.api import ConsumerView, KeyValue, MessageBus, Puller, StoredMessage

log = logging.getLogger(__name__)

HANDOVER_RECONNECT = 1.0
"""Seconds a leaving instance waits for a connection that is down to come back before it
leaves without handing its partitions over."""

KV_OPERATION = "KV-Operation"
GONE_CHECK_WAIT = 1.0
"""Seconds a fetch error waits to learn whether the consumer is gone before pulling again."""
FORCED_CHECK_WAIT = 0.05
"""Seconds at most before a check asked for is made (else it waits for the next heartbeat)."""


class Affinity:
    """Membership and partition ownership of one stage instance."""

    def __init__(
        self,
        bus: MessageBus,
        settings: Settings,
        topology: Topology,
        stage: Stage,
        instance: str,
        quiesce: Callable[[], Awaitable[Callable[[], None]]] | None = None,
    ) -> None:
        """`quiesce` pauses the stage until nothing is in flight and returns its resume."""
        self.stage = stage
        self._quiesce = quiesce
        self.instance = instance
        self.owned: tuple[int, ...] = ()
        self.changed = asyncio.Event()
        """Set whenever `owned` changes."""
        self.puller: Puller | None = None
        self.attempts = AttemptLog(bus, topology, stage)
        """Attempt counts of the messages this instance may get, across consumers."""
        self._bus = bus
        self._settings = settings
        self._cfg = settings.affinity
        self._topology = topology
        self._stream = topology.stream_name(stage.channel)
        self._name = topology.consumer_name(stage.name, instance)
        self._seen: dict[str, float] = {}
        self._holds: dict[str, tuple[int, ...]] = {}
        self._retry = False
        self._consumer_ok = False
        self._leaving = False
        self._deaf = False  # the connection was down at a check: judge no one until back
        self._force = False
        self._moving = False  # quiescing and recreating the consumer
        self._kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None
        self._beat_task: asyncio.Task[None] | None = None

    def live(self) -> set[str]:
        """Instances of this stage heard from within `failover_after` seconds, and this one."""
        return {self.instance, *self._seen}

    async def start(self) -> None:
        """Join: announce, learn the others, take this instance's partitions."""
        self._leaving = False  # again, after a start that failed and was undone by `leave`
        self._kv = await self._bus.key_value(self._topology.members())
        await self.attempts.open()
        await self._take_over_from_predecessor()
        self._sub = await self._bus.subscribe(self._kv.subject(f"{self.stage.name}.*"))
        now = time.monotonic()
        for key, value in (await self._kv.items(f"{self.stage.name}.")).items():
            other = key.split(".", 1)[1]
            if other != self.instance:
                self._seen[other] = now
                self._holds[other] = _owned(value)
        await self._announce()
        await self.reconcile(pause=False)  # nothing is in flight yet
        self._task = asyncio.create_task(self._follow(), name=f"affinity-{self.instance}")
        self._beat_task = asyncio.create_task(self._beat(), name=f"heartbeat-{self.instance}")

    async def leave(self, under_way: bool = False) -> None:
        """Hand the partitions over now: delete this instance's consumer and announcement.

        `under_way` says handlers were cut off: what the consumer holds un-acked is then
        recorded as lost, not as failed. Best effort and never raising: whatever fails here,
        the others take over after `failover_after` anyway.
        """
        self._leaving = True
        await cancel_and_wait(task for task in (self._task, self._beat_task) if task is not None)
        if not await self._reachable(HANDOVER_RECONNECT):
            # Each call would wait out its timeout (some 15 s in all) for nothing.
            log.warning("%s: the server is unreachable; the other instances take the "
                        "partitions over after failover_after", self.instance)  # fmt: skip
            return
        with contextlib.suppress(Exception):
            await self._release(self._name, under_way=under_way)
        if self._kv is not None:
            with contextlib.suppress(Exception):
                await self._kv.delete(self._key)
        with contextlib.suppress(Exception):
            await self._sub.close()
        if self.puller is not None:
            with contextlib.suppress(Exception):
                await self.puller.close()

    async def _reachable(self, within: float) -> bool:
        """Whether the connection is up, or comes back within `within` seconds."""
        give_up = time.monotonic() + within
        while not self._bus.connected:
            if time.monotonic() > give_up:
                return False
            await asyncio.sleep(0.05)
        return True

    @property
    def _key(self) -> str:
        return f"{self.stage.name}.{self.instance}"

    async def _take_over_from_predecessor(self) -> None:
        """If an earlier process of this instance's name left its consumer behind (it died),
        release it now instead of waiting `failover_after`: what it held un-acked is recorded
        as cut off mid-attempt. ConfigError if a live process has the same name."""
        assert self._kv is not None
        before = await self._kv.get(self._key)
        if before is not None and not _predecessor(before):
            await asyncio.sleep(self._cfg.heartbeat * 1.5)  # does the other still announce?
            after = await self._kv.get(self._key)
            if after is not None and after != before:
                raise ConfigError(
                    f"instance name {self.instance!r} is in use by a live process (announced "
                    "again meanwhile); give each process its own `instance` (ORCH_INSTANCE)"
                )
        if await self._bus.admin.consumer(self._stream, self._name) is not None:
            log.info("%s: taking over the consumer an earlier process of this name left",
                     self.instance)  # fmt: skip
            await self._release(self._name, under_way=True)

    async def _announce(self) -> None:
        assert self._kv is not None
        value = {"stage": self.stage.name, "instance": self.instance, "owned": list(self.owned),
                 "at": time.time(), "host": socket.gethostname(), "pid": os.getpid()}  # fmt: skip
        await self._kv.put(self._key, orjson.dumps(value))

    async def _beat(self) -> None:
        # Its own task, so that announcements go on while a rebalance waits for long
        # handlers to finish: a silent instance would be declared dead and lose its consumer.
        while not self._leaving:
            await asyncio.sleep(self._cfg.heartbeat)
            try:
                await self._announce()
            except Exception as exc:  # a broker outage must not end the heartbeat
                log.warning("%s: cannot announce: %s", self.instance, exc)

    def _hear(self, msg: StoredMessage) -> bool:
        """Record one announcement or goodbye; True if the membership view changed."""
        other = msg.subject.rsplit(".", 1)[-1]
        if other == self.instance:
            return False
        if msg.headers.get(KV_OPERATION) in ("DEL", "PURGE"):
            self._holds.pop(other, None)
            return self._seen.pop(other, None) is not None
        holds = _owned(msg.data)
        changed = other not in self._seen or self._holds.get(other) != holds
        self._seen[other] = time.monotonic()
        self._holds[other] = holds
        return changed

    async def _follow(self) -> None:
        beat = self._cfg.heartbeat
        next_check = time.monotonic() + beat
        while not self._leaving:
            wait = max(0.0, next_check - time.monotonic())
            if self._force:  # a check asked for (lost deliveries, a missing consumer): now
                wait = min(wait, FORCED_CHECK_WAIT)
            msg = await self._sub.next_message(wait)
            changed = msg is not None and self._hear(msg)
            # Read everything already queued before judging silence: after a stall of this
            # process, the others' heartbeats are waiting here, not missing.
            while (queued := self._sub.next_nowait()) is not None:
                changed = self._hear(queued) or changed
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + beat
                cutoff = time.monotonic() - self._cfg.failover_after
                if not self._bus.connected:  # nothing can be heard: no one is judged
                    self._deaf = True
                    continue
                if self._deaf:  # back: the others' silence counts from now
                    self._deaf = False
                    self._seen = dict.fromkeys(self._seen, time.monotonic())
                if any(seen < cutoff for seen in self._seen.values()):
                    # Before judging: what the server delivered may still be unread (this
                    # process was stopped or starved): a round trip, then read it all.
                    await self._bus.flush()
                    while (queued := self._sub.next_nowait()) is not None:
                        changed = self._hear(queued) or changed
                for other, seen in list(self._seen.items()):
                    if seen < cutoff:
                        log.info("%s: %s fell silent; taking over its share", self.instance, other)
                        del self._seen[other]
                        self._holds.pop(other, None)
                        changed = True
            if changed or (self._retry and msg is None):
                try:
                    await self.reconcile()
                except Exception as exc:  # broker trouble: keep following, try again
                    log.warning("%s: rebalancing failed (%s); retrying", self.instance, exc)
                    self._retry = True

    @property
    def consumer_name(self) -> str:
        """The name of this instance's durable consumer."""
        return self._name

    async def consumer_gone(self) -> bool:
        """Whether the server says this instance's consumer does not exist (deleted from
        outside); False while it cannot say (no leader, no connection)."""
        if not self.owned:
            return False
        try:
            # Bounded well below the API's own timeout: the caller's loop waits meanwhile.
            async with asyncio.timeout(GONE_CHECK_WAIT):
                return await self._bus.admin.consumer(self._stream, self._name) is None
        except (BusError, TimeoutError):
            return False

    @property
    def check_pending(self) -> bool:
        """A check of the consumer is asked for, or partitions are being moved."""
        return self._force or self._moving

    def check_consumer(self) -> None:
        """Ask for this instance's consumer to be verified (a fetch found it missing)."""
        self._retry = self._force = True
        self._consumer_ok = False  # else the check would find nothing to do

    async def reconcile(self, pause: bool = True) -> None:
        """Bring this instance's consumer in line with the assignment for the live set."""
        self._retry = False
        current = {other: self._holds.get(other, ()) for other in self._seen}
        current[self.instance] = self.owned
        plan = rebalance(self.stage.name, self._settings.partitions, current)
        desired = set(plan[self.instance])
        force, self._force = self._force, False
        if desired == set(self.owned) and not (force and desired):
            return
        self._moving = True
        resume = None
        try:
            resume = await self._quiesce() if pause and self._quiesce else None
            await self._move_to(desired)
        finally:
            self._moving = False
            if resume is not None:
                resume()

    async def _move_to(self, desired: set[int]) -> None:
        owned = set(self.owned)
        if owned - desired:  # release first, so the new owner can take them
            await self._set(owned & desired)
        if desired == set(self.owned) and self._consumer_ok:
            return
        try:
            await self._set(desired)
            return
        except SubjectTaken:
            await self._remove_silent()
        try:
            await self._set(desired)
        except SubjectTaken:
            free = desired - await self._held_by_others()
            with contextlib.suppress(SubjectTaken):
                await self._set(free | set(self.owned))
            self._retry = True  # the rest is still being handed over; try again next beat

    async def _set(self, partitions: set[int]) -> None:
        # Always a fresh consumer: one that gains a subject skips messages behind its cursor,
        # and one narrowed in place would still redeliver (after their nak delay) messages of
        # partitions that have a new owner. Deleting frees its un-acked messages for whoever
        # owns their partition now.
        await self._release(self._name, under_way=False)  # quiesced: nothing under way
        if self.puller is not None:
            self.puller.reset()  # a late delivery of the deleted consumer comes again
        self._consumer_ok = False
        previous, self.owned = self.owned, ()
        if partitions:
            spec = self._topology.consumer(self.stage, self.instance, partitions)
            try:
                await self._bus.admin.ensure_consumer(spec)
            except SubjectTaken:
                if previous and set(previous) <= partitions:  # keep what we had meanwhile
                    keep = self._topology.consumer(self.stage, self.instance, previous)
                    await self._bus.admin.ensure_consumer(keep)
                    await self.attempts.load()
                    self.owned, self._consumer_ok = previous, True
                raise
            await self.attempts.load()
            self._consumer_ok = True
            if self.puller is None:
                self.puller = await self._bus.pull(spec, self.stage.decl.batch)
            self.owned = tuple(sorted(partitions))
        if self.owned != previous:
            log.info("%s owns partitions %s", self.instance, list(self.owned))
            self.changed.set()
            with contextlib.suppress(Exception):
                await self._announce()

    async def _remove_silent(self) -> None:
        # Consumers of instances no longer heard from hold partitions (and un-acked messages)
        # hostage; once such an instance has been silent for failover_after, they go.
        live = {self._topology.consumer_name(self.stage.name, i) for i in self.live()}
        for consumer in await self._bus.admin.consumers(self._stream):
            age = time.time() - consumer.created
            if consumer.name not in live and age > self._cfg.failover_after:
                instance = consumer.name.removeprefix(f"{self.stage.name}_")
                if self._kv is not None and await self._kv.exists(f"{self.stage.name}.{instance}"):
                    continue  # still announcing: only this instance lost sight of it
                log.info("%s: removing consumer %s of a silent instance", self.instance,
                         consumer.name)  # fmt: skip
                await self._release(consumer.name, under_way=True, consumer=consumer)

    async def _release(
        self, name: str, *, under_way: bool, consumer: ConsumerView | None = None
    ) -> None:
        # Record what the consumer holds un-acked before deleting it frees those messages.
        try:
            if consumer is None:
                consumer = await self._bus.admin.consumer(self._stream, name)
            if consumer is not None and consumer.state.delivered > consumer.state.ack_floor:
                await self.attempts.record_unsettled(consumer, under_way=under_way)
        except BusError as exc:  # a takeover must not wait for the attempt log
            log.warning("%s: could not record the attempts of %s: %s", self.instance, name, exc)
        await self._bus.admin.delete_consumer(self._stream, name)

    async def _held_by_others(self) -> set[int]:
        held: set[int] = set()
        for consumer in await self._bus.admin.consumers(self._stream):
            if consumer.name != self._name:
                for subject in consumer.subjects:
                    p = self._topology.partition_of_subject(subject)
                    held |= set(range(self._settings.partitions)) if p is None else {p}
        return held


def _predecessor(announcement: bytes) -> bool:
    """Whether `announcement` of this instance's name was made by a process that is gone:
    one on this host whose pid is ours (a restarted container) or no longer runs."""
    try:
        found = orjson.loads(announcement)
        host, pid = found["host"], int(found["pid"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return False
    if host != socket.gethostname():
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it runs, as another user
        return False
    return False


def _owned(value: bytes) -> tuple[int, ...]:
    try:
        return tuple(sorted(int(p) for p in orjson.loads(value).get("owned", ())))
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return ()
