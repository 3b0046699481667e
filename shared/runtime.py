"""The stage runtime: the one loop that moves messages through a stage.

For each fetched message: decode -> handler -> publish to the next subject and await the
store's ack -> ack the input. The input is acked only after its output (or its dead-letter
entry) is safely stored, so a crash at any point means redelivery, never loss; the output's
`Nats-Msg-Id` (`<request_id>:<stage>`) lets the server drop the duplicate a redelivery makes.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from opentelemetry import propagate, trace
from pydantic import BaseModel

from shared import deadletter
from shared.affinity import Affinity
from shared.attempts import AttemptLog, Prior
from shared.bus import Bus, Delivery
from shared.envelope import Envelope, Hop, decode, encode
from shared.errors import BusError, MessageTooLarge
from shared.failure import Abandoned, DeadLetter, Expired, HandlerTimeout, Retry, decide
from shared.gate import Gate
from shared.settings import Settings
from shared.stage import Handler, StageSpec
from shared.topology import Topology

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("prompt-orchestrator")

FETCH_WAIT = 1.0
"""Longest the loop waits for a message; also bounds how long a stop takes to be noticed."""
REFILL_WAIT = 0.005
"""How long a few free slots wait for more to free up before work is handed to them."""
WATCHDOG_PERIOD = 0.5
"""How often handler deadlines are checked: a timeout fires up to this much late."""
ISOLATE_AFTER = 2
"""Attempts cut off by a lost consumer after which a message runs with nothing else under way
(fewer when `max_deliver` is lower: innocent neighbours must never reach the limit)."""


class StageRuntime:
    """Runs one instance of one stage against a connected bus."""

    def __init__(
        self, spec: StageSpec, settings: Settings, bus: Bus, instance: str, handler: Handler
    ) -> None:
        self.spec = spec
        self.instance = instance
        self._bus = bus
        self._handler = handler
        self._topology = Topology(settings)
        self._settings = settings
        self._stream = self._topology.stream_name(spec.input)
        self._cfg = getattr(settings.stages, spec.name)
        self._max_bytes = settings.max_message_bytes
        self._stopping = asyncio.Event()
        self._inflight: dict[Delivery, float] = {}
        self.affinity: Affinity | None = None
        self._attempts: AttemptLog | None = None
        self._gate = Gate()
        self._deadlines: dict[asyncio.Task[None], float] = {}
        self._timed_out: set[asyncio.Task[None]] = set()
        # A message under way beside one that keeps killing the process is cut off at most
        # this many times before that one runs alone: it must stay below max_deliver.
        self._isolate_after = max(1, min(ISOLATE_AFTER, self._cfg.max_deliver - 1))
        self.last_loop = time.monotonic()
        """When the fetch loop last went round: a loop that stops turning is unhealthy."""

    def stop(self) -> None:
        """Ask the loop to stop fetching; `run` returns once in-flight messages are settled."""
        self._stopping.set()

    async def run(self) -> None:
        """Fetch and process until `stop` is called, then drain what was fetched."""
        tasks: set[asyncio.Task[None]] = set()
        pause_requested = asyncio.Event()
        parked = asyncio.Event()
        resumed = asyncio.Event()

        async def quiesce() -> Callable[[], None]:
            # Called by the affinity task to change partitions: returns once the loop is
            # parked with nothing in flight, and hands back the function that resumes it.
            resumed.clear()
            pause_requested.set()
            await parked.wait()

            def resume() -> None:
                pause_requested.clear()
                parked.clear()
                resumed.set()

            return resume

        affinity = Affinity(self._bus, self._settings, self.spec, self.instance, quiesce)
        await affinity.start()
        self.affinity = affinity
        self._attempts = affinity.attempts
        heartbeat = asyncio.create_task(self._keep_alive())
        watchdog = asyncio.create_task(self._watchdog())
        limit, batch = self._cfg.concurrency, self._cfg.batch
        # Hand out work in sizeable portions: a task per message is cheap, a loop turn per
        # message is not. A free slot still gets work within REFILL_WAIT when handlers are slow.
        refill = max(1, min(batch, limit) // 2)
        room = asyncio.Event()

        def finished(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            free = limit - len(tasks)
            if free >= refill or free == 1:  # 1: the first slot after all were busy
                room.set()

        try:
            while True:
                self.last_loop = time.monotonic()
                puller = affinity.puller
                # Stopping or handing partitions over: ask for nothing more, but take in
                # what was asked for; delivered to a closed inbox it would wait for ack_wait.
                winding_down = self._stopping.is_set() or pause_requested.is_set()
                # Every wait below is bounded by FETCH_WAIT so that the loop keeps turning
                # (the health check's sign of life) while slow handlers hold every slot.
                # Once parked, the consumer may be deleted and recreated under the puller:
                # nothing is taken until the move is over.
                if winding_down and (puller is None or puller.idle or parked.is_set()):
                    if self._stopping.is_set():
                        break
                    if tasks:
                        await asyncio.wait(tasks, timeout=FETCH_WAIT)
                        continue
                    parked.set()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(FETCH_WAIT):
                            await resumed.wait()
                    continue
                free = limit - len(tasks)
                if free < refill:
                    room.clear()
                    if free == 0:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(FETCH_WAIT):
                                await room.wait()
                        continue
                    else:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(REFILL_WAIT):
                                await room.wait()
                    free = limit - len(tasks)
                if puller is None or not affinity.owned:  # more instances than partitions
                    affinity.changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(FETCH_WAIT):
                            await affinity.changed.wait()
                    continue
                try:
                    deliveries = await puller.fetch(free, FETCH_WAIT, ask=not winding_down)
                except BusError as exc:
                    log.warning("%s: %s; retrying", self.instance, exc)
                    affinity.check_consumer()  # e.g. deleted from outside: recreate it
                    await asyncio.sleep(0.5)
                    continue
                for delivery in deliveries:
                    task = asyncio.create_task(self._process(delivery))
                    tasks.add(task)
                    task.add_done_callback(finished)
        finally:
            # Everything received is processed before the subscription closes: abandoned,
            # it would sit un-acked until ack_wait.
            cut_off = False
            try:
                if tasks:
                    await asyncio.wait(tasks)
            except asyncio.CancelledError:
                # drain_timeout passed: what is still under way is cut off, and counted as
                # such, rather than left running without its watchdog and keep-alive.
                cut_off = bool(tasks)
                for task in tasks:
                    task.cancel()
                if tasks:
                    await asyncio.wait(tasks, timeout=5.0)
                raise
            finally:  # even when cancelled after drain_timeout, hand the partitions over
                heartbeat.cancel()
                watchdog.cancel()
                await asyncio.shield(affinity.leave(under_way=cut_off))

    async def _process(self, delivery: Delivery) -> None:
        received = time.time()
        self._inflight[delivery] = received
        attempts = self._attempts
        prior = attempts.prior(delivery.stream_seq, delivery.headers) if attempts else None
        try:
            if prior is None:  # nearly every message
                if not self._gate.try_enter():
                    await self._gate.enter()
                try:
                    await self._attempt(delivery, received, delivery.delivered)
                finally:
                    self._gate.leave()
            elif await self._suspect(delivery, received, prior):
                assert attempts is not None
                await attempts.settled(delivery.stream_seq)
        finally:
            del self._inflight[delivery]

    async def _suspect(self, delivery: Delivery, received: float, prior: Prior) -> bool:
        """Handle a message that an earlier consumer held un-acked; True once it is settled.

        Once it has been cut off mid-attempt `isolate_after` times it runs alone, so that if
        it kills the process again no other message is under way to be cut off with it.
        """
        if prior.losses >= self._isolate_after:
            async with self._gate.exclusive():
                return await self._recorded_attempt(delivery, received, prior)
        await self._gate.enter()
        try:
            return await self._recorded_attempt(delivery, received, prior)
        finally:
            self._gate.leave()

    async def _recorded_attempt(self, delivery: Delivery, received: float, prior: Prior) -> bool:
        assert self._attempts is not None
        failures = prior.failures + delivery.delivered - 1
        if prior.losses < self._cfg.max_deliver and failures < self._cfg.max_deliver:
            # Written before the attempt starts, so that a crash during it still counts.
            wait = 0.5
            while True:
                try:
                    await self._attempts.started(
                        delivery.stream_seq, delivery.headers, prior, failures
                    )
                    break
                except BusError as exc:
                    # Held (the keep-alive stops redelivery), not nak'ed: a nak would spend a
                    # delivery on an attempt that never ran.
                    if self._stopping.is_set():
                        return False
                    log.warning("%s: cannot record attempt (%s); retrying in %.1fs",
                                self.instance, exc, wait)  # fmt: skip
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, 10.0)
        return await self._attempt(delivery, received, failures + 1, prior)

    async def _attempt(
        self, delivery: Delivery, received: float, attempt: int, prior: Prior | None = None
    ) -> bool:
        """Handle one delivery; True if it was settled (acked or dead-lettered).

        `attempt` counts the attempts that failed cleanly before, plus this one; `prior`
        holds what earlier consumers recorded for a suspect.
        """
        envelope: Envelope | None = None
        try:
            envelope = decode(delivery.data, Envelope, self._max_bytes)
            if prior is not None and prior.losses >= self._cfg.max_deliver:
                raise Abandoned(
                    f"cut off {prior.losses} times (at most {self._cfg.max_deliver}): the "
                    "stage died or was stopped while handling it"
                )
            if attempt > self._cfg.max_deliver:
                raise Abandoned(
                    f"attempt {attempt} of at most {self._cfg.max_deliver}: the earlier ones "
                    "ended without a result (the handler timed out or the stage was stopped)"
                )
            if envelope.deadline is not None and envelope.deadline < received:
                late = received - envelope.deadline
                raise Expired(f"deadline passed {late:.3f}s before {self.spec.name} received it")
            if deadletter.TRACEPARENT in delivery.headers:
                output, trace_headers = await self._traced(delivery, envelope)
            else:  # untraced messages pay nothing for tracing
                output, trace_headers = await self._call(envelope), None
            await self._forward(envelope, output, received, trace_headers)
            await delivery.ack()
            return True
        except Exception as exc:  # any failure becomes a retry or a dead letter, never a crash
            return await self._settle_failure(delivery, envelope, exc, attempt, prior)

    async def _call(self, envelope: Envelope) -> BaseModel:
        # A hung handler (a model server that never answers) would hold its slot, and the
        # keep-alive would hold its message, until the process stops. The watchdog cancels
        # it past its deadline: cheaper per message than an asyncio.timeout around each call.
        task = asyncio.current_task()
        assert task is not None
        self._deadlines[task] = time.monotonic() + self._cfg.timeout
        try:
            output = await self._handler(envelope)
        except asyncio.CancelledError:
            if task in self._timed_out and task.cancelling() == 1:  # only the watchdog's
                task.uncancel()
                raise HandlerTimeout(
                    f"{self.spec.name} handler took longer than {self._cfg.timeout:g}s"
                ) from None
            raise
        else:
            if task in self._timed_out:  # the handler swallowed the cancellation
                task.uncancel()
            return output
        finally:
            del self._deadlines[task]
            self._timed_out.discard(task)

    async def _traced(
        self, delivery: Delivery, envelope: Envelope
    ) -> tuple[BaseModel, dict[str, str]]:
        # A span per stage, child of the caller's (W3C trace context in the headers); with no
        # OpenTelemetry SDK configured the caller's context passes through unchanged.
        parent = propagate.extract(delivery.headers)
        with _tracer.start_as_current_span(
            f"{self.spec.name} process",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": delivery.subject,
                "orchestrator.request_id": envelope.request_id,
                "orchestrator.instance": self.instance,
            },
        ):
            output = await self._call(envelope)
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
        return output, carrier

    async def _forward(
        self,
        envelope: Envelope,
        output: BaseModel,
        received: float,
        headers: dict[str, str] | None,
    ) -> None:
        hops: list[Hop] = output.hops  # type: ignore[attr-defined]
        hops.append(
            Hop(stage=self.spec.name, instance=self.instance, received=received, done=time.time())
        )
        subject = self._topology.output_subject(
            self.spec.output, envelope.session_id, envelope.request_id
        )
        await self._bus.publish(
            subject,
            encode(output),
            msg_id=f"{envelope.request_id}:{self.spec.name}",
            headers=headers,
        )

    async def _settle_failure(
        self,
        delivery: Delivery,
        envelope: Envelope | None,
        exc: Exception,
        attempt: int,
        prior: Prior | None,
    ) -> bool:
        """Retry or dead-letter after a failed attempt; True if the message left for good."""
        action = decide(exc, attempt, self._cfg.max_deliver, self._cfg.backoff)
        try:
            if isinstance(action, Retry):
                log.debug("%s: retry in %.1fs after %r", self.instance, action.delay, exc)
                if prior is not None and self._attempts is not None:
                    await self._close_record(delivery, prior, attempt)
                await delivery.nak(delay=action.delay)
                return False
            losses = prior.losses if prior is not None else 0
            return await self._dead_letter(delivery, envelope, action, attempt + losses)
        except Exception as settle_exc:
            # Neither acked nor nak'ed: the server redelivers after ack_wait. Nothing is lost.
            log.warning("%s: could not settle message: %s", self.instance, settle_exc)
            return False

    async def _close_record(self, delivery: Delivery, prior: Prior, failures: int) -> None:
        # Before the nak: once redelivered, the next attempt writes its own record.
        assert self._attempts is not None
        try:
            await self._attempts.failed(delivery.stream_seq, delivery.headers, prior, failures)
        except BusError as exc:  # left open, the attempt would later count as a loss
            log.warning("%s: cannot record a failed attempt: %s", self.instance, exc)

    async def _dead_letter(
        self, delivery: Delivery, envelope: Envelope | None, action: DeadLetter, attempt: int
    ) -> bool:
        headers = deadletter.entry_headers(
            reason=action.reason,
            error=action.error,
            stage=self.spec.name,
            subject=delivery.subject,
            delivered=attempt,
            request_id=envelope.request_id if envelope else None,
            session_id=envelope.session_id if envelope else None,
            original=delivery.headers,
        )
        # Keyed by the input's stream sequence, so a redelivered copy is stored only once.
        msg_id = f"dlq:{self._stream}:{delivery.stream_seq}"
        subject = self._topology.dlq_subject(self.spec.name, action.reason)
        payload = delivery.data
        wait = 0.5
        while True:
            try:
                await self._bus.publish(subject, payload, msg_id=msg_id, headers=headers)
                break
            except MessageTooLarge:
                # Only an input at the server's own limit gets here (it was refused as over
                # max_message_bytes): keep what fits, and say how much there was.
                headers[deadletter.TRUNCATED] = str(len(delivery.data))
                payload = payload[: max(0, len(payload) - 64 * 1024)]
                continue
            except BusError as exc:
                # A nak would spend one of the message's deliveries; once they ran out it
                # would sit in its stream for good. So it is held here (the keep-alive stops
                # redelivery) until the dead-letter stream has room again.
                if self._stopping.is_set():
                    await delivery.nak()
                    return False
                log.warning("%s: dead-letter stream refused entry (%s); retrying in %.1fs",
                            self.instance, exc, wait)  # fmt: skip
                await asyncio.sleep(wait)
                wait = min(wait * 2, 10.0)
        await delivery.ack()
        log.debug("%s: dead-lettered (%s): %s", self.instance, action.reason, action.error)
        return True

    async def _watchdog(self) -> None:
        # While a task is listed in _deadlines it is suspended inside its handler (the entry
        # goes as soon as the handler returns), so the cancellation lands there.
        period = min(WATCHDOG_PERIOD, self._cfg.timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for task, deadline in list(self._deadlines.items()):
                if deadline <= now and task not in self._timed_out:
                    self._timed_out.add(task)
                    task.cancel()

    async def _keep_alive(self) -> None:
        # Long handlers (model calls) must not outlive ack_wait, or the message is redelivered
        # to another instance while still being worked on here.
        period = self._cfg.ack_wait / 3
        while True:
            await asyncio.sleep(period)
            cutoff = time.time() - period
            for delivery, started in list(self._inflight.items()):
                if started < cutoff:
                    try:
                        await delivery.in_progress()
                    except Exception as exc:
                        log.debug("in_progress failed: %s", exc)
