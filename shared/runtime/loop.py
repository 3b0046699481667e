"""The stage runtime: the one loop that moves messages through a stage instance.

For each message: decode -> the middleware chain around the handler -> route the output ->
publish it to the next stage's channel (or the results) and await the store's ack -> ack the
input. The input is acked only after its output (or its dead-letter entry) is safely stored,
so a crash at any point means redelivery, never loss; the output's `Nats-Msg-Id`
(`<request_id>:<stage>`) lets the server drop the duplicate a redelivery makes.

Lifecycle of `run`: set up the handler and middleware (their factories' context managers are
entered), join the stage's membership and take this instance's partitions, consume until
`stop`, drain what was taken, hand the partitions over, then tear the handler and middleware
down.
"""

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, TypeVar

import msgspec

from shared import deadletter
from shared.components import Context, open_component
from shared.envelope import (
    DeadLettered,
    Envelope,
    Hop,
    Result,
    decode,
    decode_answer,
    encode,
    peek_ids,
)
from shared.errors import (
    BusError,
    ConfigError,
    InvalidMessage,
    MessageTooLarge,
    Overloaded,
)
from shared.failure import (
    Abandoned,
    DeadLetter,
    Expired,
    Reason,
    Reject,
    Retry,
    decide,
    describe,
)
from shared.gate import Gate
from shared.graph import INTAKE
from shared.metrics import Metrics
from shared.middleware import Call, CallNext, Middleware, Outcome, Output, compose, observers
from shared.runtime.affinity import Affinity
from shared.runtime.attempts import AttemptLog, Prior
from shared.runtime.plan import StagePlan
from shared.runtime.room import Room
from shared.runtime.timeouts import Timeouts
from shared.runtime.tokens import TokenStream
from shared.runtime.tracing import Tracing
from shared.settings import Settings
from shared.stage import Partial, Streaming, StreamingHandler
from shared.topology import OUTCOMES, RESULTS, Topology
from shared.transport.api import VOID, ConsumerView, Delivery, MessageBus
from shared.transport.retry import REFUSALS, patiently

log = logging.getLogger(__name__)
T = TypeVar("T")

FETCH_WAIT = 1.0
"""Longest the loop waits for a message; also bounds how long a stop takes to be noticed."""
REFILL_WAIT = 0.005
"""How long a few free slots wait for more to free up before work is handed to them."""
LOST_CHECK = 0.5
"""Seconds between an idle instance's looks for deliveries lost on the way."""
ISOLATE_AFTER = 2
"""Attempts cut off by a lost consumer after which a message runs with nothing else under way
(fewer when `max_deliver` is lower: innocent neighbours must never reach the limit)."""


OUTCOME_ERROR = 1024
"""Characters of the error a dead-lettered request's outcome carries (the entry has it all)."""


class StageRuntime:
    """Runs one instance of one stage against a connected bus."""

    def __init__(
        self,
        plan: StagePlan,
        settings: Settings,
        topology: Topology,
        bus: MessageBus,
        instance: str,
        metrics: Metrics | None = None,
    ) -> None:
        self.plan = plan
        self._metrics = metrics
        self.stage = plan.stage
        self.name = plan.stage.name
        self.instance = instance
        self._bus = bus
        self._topology = topology
        self._settings = settings
        self._stream = topology.stream_name(self.stage.channel)
        self._from_client = self.stage.channel == INTAKE
        self._cfg = self.stage.decl
        graph = topology.graph
        self._channels = {name: graph[name].channel for name in self.stage.route.targets}
        """The channel of each stage this one's output may go to."""
        self._rooms: dict[str | None, Room] = {to: Room() for to in [None, *self._channels]}
        """Turns at each next channel (None: the results) while it is full."""
        # A client's request is held to the intake's limit; later, a message has grown by what
        # stages added (shared.limits) and only the server's limit applies.
        self._max_bytes = settings.max_message_bytes if self._from_client else bus.max_payload
        self._stopping = asyncio.Event()
        self._inflight: dict[Delivery, float] = {}
        self.affinity: Affinity | None = None
        self._attempts: AttemptLog | None = None
        self._gate = Gate()
        self._chain: CallNext | None = None
        self._observers: list[Middleware] = []
        # A message under way beside one that keeps killing the process is cut off at most
        # this many times before that one runs alone: it must stay below max_deliver.
        self._isolate_after = max(1, min(ISOLATE_AFTER, self._cfg.max_deliver - 1))
        self.last_loop = time.monotonic()
        """When the fetch loop last went round: a loop that stops turning is unhealthy."""
        self._taken = 0  # deliveries taken in so far
        self._finished = 0  # and done with (settled, or left to come again)
        self._retries_due = 0.0  # when the last message nak'ed with a delay comes back

    @property
    def in_flight(self) -> int:
        """Messages this instance holds and has not settled."""
        return len(self._inflight)

    def deliveries(self) -> list[Delivery]:
        """The messages this instance holds and has not settled."""
        return list(self._inflight)

    def stop(self) -> None:
        """Ask the loop to stop fetching; `run` returns once in-flight messages are settled."""
        self._stopping.set()

    @property
    def ready(self) -> bool:
        """Joined its stage's membership and consuming: not starting, not draining."""
        return self.affinity is not None and not self._stopping.is_set()

    async def consumer_view(self) -> ConsumerView | None:
        """This instance's consumer as the server reports it (None: it has none now)."""
        if self.affinity is None:
            return None
        return await self._bus.admin.consumer(self._stream, self.affinity.consumer_name)

    async def partition_counts(self) -> dict[int, int]:
        """Messages in each partition of the channel this instance owns (waiting or un-acked)."""
        if self.affinity is None or not self.affinity.owned:
            return {}
        topology = self._topology
        subjects = topology.channel_subjects(self.stage.channel)
        counts = await self._bus.admin.subject_counts(self._stream, subjects)
        found = {topology.partition_of_subject(s): n for s, n in counts.items()}
        return {p: found.get(p, 0) for p in sorted(self.affinity.owned)}

    async def run(self) -> None:
        """Set up, consume until `stop` is called, drain what was taken, hand over, tear down."""
        async with contextlib.AsyncExitStack() as stack:
            await self._set_up(stack)
            await self._consume()

    async def _set_up(self, stack: contextlib.AsyncExitStack) -> None:
        plan = self.plan
        handler = await open_component(plan.handler, self._context(plan.handler.options), stack)
        chain: list[Middleware] = [Tracing()]
        if self._metrics is not None:
            chain += self._metrics.for_stage(self.name, self.instance, last=self.stage.last)
        for prepared in plan.middleware:
            made = await open_component(prepared, self._context(prepared.options), stack)
            if not isinstance(made, Middleware):
                raise ConfigError(
                    f"{prepared.reference} made a {type(made).__name__}, "
                    "not a shared.middleware.Middleware"
                )
            chain.append(made)
        chain.append(await stack.enter_async_context(Timeouts(self.name, self._cfg.timeout)))
        self._chain = compose(chain, self._innermost(handler))
        self._observers = observers(chain)

    def _innermost(self, handler: Any) -> CallNext:
        """The call of `handler` itself: a plain one, or one whose pieces are published (a
        `Streaming` handler's plain path takes the requests whose tokens nobody follows)."""
        if isinstance(handler, Streaming):
            streaming, plain = self._streamed(handler.stream), handler.complete

            def either(call: Call) -> Awaitable[Output]:
                return streaming(call) if call.request.stream else plain(call.request)

            return either
        if inspect.isasyncgenfunction(handler):
            return self._streamed(handler)

        def call(call: Call) -> Awaitable[Output]:
            return handler(call.request)  # the handler's own coroutine: no frame of ours

        return call

    def _streamed(self, handler: StreamingHandler) -> CallNext:
        """The call of a streaming handler: its pieces go to the request's token stream
        when the request asked for them."""

        async def streaming(call: Call) -> Output:
            request, output = call.request, None
            tokens = None
            if request.stream:
                subject = self._topology.token_subject(request.request_id)
                tokens = TokenStream(self._bus, subject, request.request_id, call.attempt,
                                     self._settings.tokens.window)  # fmt: skip
            async for item in handler(request):
                if isinstance(item, Partial):
                    if tokens is not None:
                        await tokens.add(item)
                else:
                    output = item
            if output is None:
                raise Reject(f"{self.name}: the handler yielded pieces but no output")
            if tokens is not None:
                await tokens.close()
            return output

        return streaming

    def _context(self, options: object) -> Context[object]:
        return Context(
            stage=self.name,
            instance=self.instance,
            options=options,
            subject_prefix=self._settings.subject_prefix,
            requester=self._bus,
        )

    async def _consume(self) -> None:
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

        affinity = Affinity(self._bus, self._settings, self._topology, self.stage, self.instance,
                            quiesce)  # fmt: skip
        await self._joined(affinity)
        self.affinity = affinity
        self._attempts = affinity.attempts
        heartbeat = asyncio.create_task(self._keep_alive())
        lost_watch = asyncio.create_task(self._watch_for_lost(affinity))
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
                    await _wait(resumed, FETCH_WAIT)
                    continue
                free = limit - len(tasks)
                if free < refill:
                    room.clear()
                    await _wait(room, FETCH_WAIT if free == 0 else REFILL_WAIT)
                    if free == 0:
                        continue
                    free = limit - len(tasks)
                if puller is None or not affinity.owned:  # more instances than partitions
                    affinity.changed.clear()
                    await _wait(affinity.changed, FETCH_WAIT)
                    continue
                try:
                    deliveries = await puller.fetch(free, FETCH_WAIT, ask=not winding_down)
                except BusError as exc:
                    # Retried in place: a leader election or a reconnect passes by itself.
                    # The consumer is recreated only when the server says it is gone.
                    log.warning("%s: %s; retrying", self.instance, exc)
                    if await affinity.consumer_gone():
                        affinity.check_consumer()
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
                lost_watch.cancel()
                await asyncio.shield(affinity.leave(under_way=cut_off))

    async def _process(self, delivery: Delivery) -> None:
        self._taken += 1
        if VOID in delivery.headers:  # a stage before this one dead-lettered the request
            await delivery.ack()
            return
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
            self._finished += 1

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
            attempts = self._attempts

            async def record() -> int:
                await attempts.started(delivery.stream_seq, delivery.headers, prior, failures)
                return 0

            if await self._held(record, "recording the attempt") is None:
                return False
        return await self._attempt(delivery, received, failures + 1, prior)

    async def _attempt(
        self, delivery: Delivery, received: float, attempt: int, prior: Prior | None = None
    ) -> bool:
        """Handle one delivery; True if it was settled (acked or dead-lettered).

        `attempt` counts the attempts that failed cleanly before, plus this one; `prior`
        holds what earlier consumers recorded for a suspect.
        """
        request: Envelope | None = None
        call: Call | None = None
        suspect = delivery.delivered > 1 or prior is not None  # it may have been handled
        try:
            request = decode(delivery.data, Envelope, self._max_bytes)
            self._check_place(request, delivery.subject)
            if suspect and (decided := await self._decided(delivery)) is not None:
                return await self._dead_letter(delivery, request, decided, attempt, repeat=True)
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
            if request.deadline is not None and request.deadline < received:
                late = received - request.deadline
                raise Expired(f"deadline passed {late:.3f}s before {self.name} received it")
            call = Call(self.name, self.instance, request, attempt, delivery.subject,
                        delivery.headers, received)  # fmt: skip
            assert self._chain is not None
            output = await self._chain(call)
            to = await self._forward(request, output, received, call.carry, delivery.headers)
            await delivery.ack()
            if delivery.delivered > 1 and self._attempts is not None:
                self._attempts.done(delivery.stream_seq)  # a retry that succeeded
            if self._observers:
                self._notify(request, Outcome("forwarded", time.time() - received, to=to))
            return True
        except Exception as exc:  # any failure becomes a retry or a dead letter, never a crash
            carry = call.carry if call is not None else None  # the trace it was handled in
            return await self._settle_failure(
                delivery, request, exc, attempt, prior, received, suspect, carry
            )

    async def _forward(
        self,
        request: Envelope,
        output: object,
        received: float,
        carry: dict[str, str] | None,
        received_headers: Mapping[str, str],
    ) -> str | None:
        """Publish the handler's output where it goes; return the next stage (None: result)."""
        if isinstance(output, Envelope):
            to = self.stage.route(output)
            if to is None:
                raise Reject(f"{self.name} is a last stage (no next): its handler must return "
                             "a Result, not an Envelope")  # fmt: skip
        elif isinstance(output, Result):
            to = None
            if not self.stage.last:
                raise Reject(f"{self.name} returned a Result, but its output goes on to "
                             f"{self.stage.route.default!r}: return an Envelope")  # fmt: skip
        else:
            raise Reject(f"{self.name} handler returned {type(output).__name__}, not an "
                         "Envelope or a Result")  # fmt: skip
        output.hops.append(
            Hop(stage=self.name, instance=self.instance, received=received, done=time.time())
        )
        try:
            payload = encode(output)
        except TypeError as exc:  # a value in `data` that JSON cannot carry
            raise Reject(f"{self.name} output cannot be encoded as JSON: {exc}") from None
        if to is None:
            subject = self._topology.result_subject(request.request_id)
        else:
            subject = self._topology.subject_for(self._channels[to], request.session_id)
        headers = carry
        replay = received_headers.get(deadletter.REPLAY_OF)
        if replay is not None:
            headers = {**(carry or {}), deadletter.REPLAY_OF: replay}
        msg_id = self._output_id(request, replay)
        give_up, trouble = time.monotonic() + self._cfg.shed_after, 0.25
        room = self._rooms[to]
        if room.full:  # others wait for their turn at it: so does this one
            await room.wait(self._cfg.shed_after)
        while True:
            try:
                await self._bus.publish(subject, payload, msg_id=msg_id, headers=headers)
                room.passed()
                return to
            except MessageTooLarge as exc:  # no retry makes it smaller
                raise Reject(f"{self.name}'s output is too large to pass on: {exc}") from None
            except Overloaded as exc:
                # A full next channel: wait for room (a restart, a burst) before shedding,
                # taking turns with this instance's other messages for it.
                left = give_up - time.monotonic()
                if left <= 0:
                    raise Overloaded(exc.subject, f"still full after {self._cfg.shed_after:g}s "
                                     f"(stages.{self.name}.shed_after)") from None  # fmt: skip
                if not await room.refused(left):
                    await room.wait(left)
            except BusError as exc:
                # A leader election, a reconnect, a timeout: it passes. Retried here, the
                # handler's work is kept and no attempt is spent (the keep-alive holds the
                # input); the same message id makes a publish that did land count once.
                if self._stopping.is_set():
                    raise
                log.warning("%s: passing %s on failed (%s); retrying in %.2fs", self.instance,
                            request.request_id, exc, trouble)  # fmt: skip
                await asyncio.sleep(trouble)
                trouble = min(trouble * 2, 1.0)

    def _notify(self, request: Envelope | None, outcome: Outcome) -> None:
        for mw in self._observers:
            try:
                mw.settled(self.name, request, outcome)
            except Exception as exc:  # an observer must not change what happened
                log.warning("%s: middleware %s failed in settled: %r", self.instance,
                            type(mw).__name__, exc)  # fmt: skip

    async def _settle_failure(
        self,
        delivery: Delivery,
        request: Envelope | None,
        exc: Exception,
        attempt: int,
        prior: Prior | None,
        received: float,
        suspect: bool,
        carry: Mapping[str, str] | None = None,
    ) -> bool:
        """Retry or dead-letter after a failed attempt; True if the message left for good.
        `carry`: the headers the attempt would have passed on (its trace context)."""
        action = decide(exc, attempt, self._cfg.max_deliver, self._cfg.backoff)
        try:
            if isinstance(action, Retry):
                log.debug("%s: retry in %.1fs after %r", self.instance, action.delay, exc)
                if prior is not None and self._attempts is not None:
                    await self._close_record(delivery, prior, attempt)
                elif self._attempts is not None:  # counted if the consumer is recreated
                    self._attempts.retrying(delivery.stream_seq, delivery.headers, attempt)
                await delivery.nak(delay=action.delay)
                due = time.monotonic() + action.delay + LOST_CHECK
                self._retries_due = max(self._retries_due, due)
                if self._observers:
                    outcome = Outcome("retried", time.time() - received, delay=action.delay,
                                      error=describe(exc))  # fmt: skip
                    self._notify(request, outcome)
                return False
            losses = prior.losses if prior is not None else 0
            settled = await self._dead_letter(
                delivery, request, action, attempt + losses, suspect=suspect, carry=carry
            )
            if settled and self._observers:
                outcome = Outcome("dead_lettered", time.time() - received,
                                  reason=action.reason.value, error=action.error)  # fmt: skip
                self._notify(request, outcome)
            return settled
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

    def _check_place(self, request: Envelope, subject: str) -> None:
        """InvalidMessage unless `request` came on its session's partition subject, and, at the
        intake, without the sections only stages write."""
        expected = self._topology.subject_for(self.stage.channel, request.session_id)
        if subject != expected:  # it would bypass session affinity
            raise InvalidMessage(f"published on {subject}, but session {request.session_id!r} "
                                 f"belongs on {expected}")  # fmt: skip
        if self._from_client and (request.data or request.hops):
            raise InvalidMessage("data, hops: written by the stages; a request may not set them")

    async def _decided(self, delivery: Delivery) -> DeadLetter | None:
        """The dead-letter decision an earlier attempt took on `delivery` and may not have
        carried out (it crashed), if any. Raises BusError if the stage stops meanwhile."""
        attempts = self._attempts
        if attempts is None:
            return None

        async def read() -> tuple[tuple[str, str] | None]:
            return (await attempts.decided(delivery.stream_seq, delivery.headers),)

        found = await self._held(read, "reading the dead-letter decision")
        if found is None:
            raise BusError("stopping before the dead-letter decision could be read")
        if found[0] is None:
            return None
        reason, error = found[0]
        return DeadLetter(Reason(reason), error)

    def _output_id(self, request: Envelope, replay: str | None) -> str:
        """The message id of this stage's output for `request`: the same for every delivery
        of one input, so the server stores one; a replay's (`replay`: the dead-letter entry it
        came from) is its own."""
        suffix = "" if replay is None else f":replay{replay}"
        return f"{request.request_id}:{self.name}{suffix}"

    async def _went_on(self, request: Envelope, received_headers: Mapping[str, str]) -> bool:
        """Whether an earlier attempt passed `request` on (its output is stored).

        Asked before dead-lettering a message that may have been handled before, so that a
        request never ends in two places. For a last stage the result is looked up; otherwise
        a void message with the output's id is published to every channel the output could
        go to: the server refuses it as a duplicate exactly when the output was stored there
        (within `duplicate_window`), and a stored one tells the next stage nothing came.
        """
        if self.stage.last:
            results = self._topology.stream_name(RESULTS)
            subject = self._topology.result_subject(request.request_id)
            stored = await self._bus.admin.last_message(results, subject)
            if stored is None:
                return False
            try:
                return isinstance(decode_answer(stored.data, len(stored.data)), Result)
            except InvalidMessage:
                return False
        msg_id = self._output_id(request, received_headers.get(deadletter.REPLAY_OF))
        went = False
        for channel in self._channels.values():
            subject = self._topology.subject_for(channel, request.session_id)
            try:
                stored = await self._bus.publish_once(subject, b"", msg_id=msg_id,
                                                      headers={VOID: self.name})  # fmt: skip
            except Overloaded:  # not a duplicate (that is found first), so not passed on
                continue
            went = went or not stored
        return went

    async def _dead_letter(
        self,
        delivery: Delivery,
        request: Envelope | None,
        action: DeadLetter,
        attempt: int,
        *,
        suspect: bool = False,
        repeat: bool = False,
        carry: Mapping[str, str] | None = None,
    ) -> bool:
        """Store the dead-letter entry and the request's outcome, then ack; True if settled.

        `suspect`: the message may have been handled before (it was delivered before), so
        it is dead-lettered only if it did not go on then. `repeat`: carry out the decision an
        earlier attempt recorded and may not have finished.
        """
        if suspect and not repeat and request is not None:
            went_on = partial(self._went_on, request, delivery.headers)
            gone = await self._held(went_on, "checking its output")
            if gone is None:
                await delivery.nak()
                return False
            if gone:
                log.info("%s: %s was passed on before; not dead-lettering it (%s)",
                         self.instance, request.request_id, action.error)  # fmt: skip
                await delivery.ack()
                if self._attempts is not None:
                    self._attempts.done(delivery.stream_seq)
                return True
        if not repeat and self._attempts is not None:
            decide_it = partial(self._attempts.deciding, delivery.stream_seq, delivery.headers,
                                action.reason.value, action.error)  # fmt: skip
            if await self._held(decide_it, "recording the dead-letter decision") is None:
                await delivery.nak()
                return False
        request_id, session_id = (
            (request.request_id, request.session_id) if request else peek_ids(delivery.data)
        )
        headers = deadletter.entry_headers(
            reason=action.reason,
            error=action.error,
            stage=self.name,
            subject=delivery.subject,
            delivered=attempt,
            request_id=request_id,
            session_id=session_id,
            original={**delivery.headers, **carry} if carry else delivery.headers,
        )
        # Keyed by the input's stream sequence, so a redelivered copy is stored only once.
        msg_id = f"dlq:{self._stream}:{delivery.stream_seq}"
        subject = self._topology.dlq_subject(self.name, action.reason)
        payload = delivery.data
        while True:
            try:
                store = partial(self._bus.publish, subject, payload, msg_id=msg_id, headers=headers)
                seq = await self._held(store, "storing the dead-letter entry")
                break
            except MessageTooLarge:
                # Only an input at the server's own limit gets here (it was refused as over
                # max_message_bytes): keep what fits, and say how much there was.
                headers[deadletter.TRUNCATED] = str(len(delivery.data))
                payload = payload[: max(0, len(payload) - 64 * 1024)]
        if seq is None:
            await delivery.nak()
            return False
        if request_id is not None:  # its client learns how it ended, where it waits
            outcome = DeadLettered(
                request_id=request_id, session_id=session_id, status=action.reason.value,
                stage=self.name, error=action.error[:OUTCOME_ERROR], dead_letter_seq=seq,
                at=time.time(),
            )  # fmt: skip
            try:
                told = await self._held(partial(self._tell, outcome), "storing the outcome")
            except MessageTooLarge:  # at a small max_message_bytes: the entry has it all
                short = msgspec.structs.replace(outcome, session_id=None, error=outcome.error[:200])
                told = await self._held(partial(self._tell, short), "storing the outcome")
            if told is None:
                await delivery.nak()
                return False
        await delivery.ack()
        if self._attempts is not None:
            self._attempts.done(delivery.stream_seq)
            await self._attempts.carried_out(delivery.stream_seq)
        log.debug("%s: dead-lettered (%s): %s", self.instance, action.reason, action.error)
        return True

    async def _tell(self, outcome: DeadLettered) -> int:
        # Counted before it is stored (both once per entry, by message id): `status` takes
        # outcomes from the results stream's count to find the completed requests.
        once = f"outcome:{outcome.dead_letter_seq}"
        await self._bus.increment(self._topology.counter_subject(OUTCOMES), 1, msg_id=once)
        subject = self._topology.result_subject(outcome.request_id)
        return await self._bus.publish(subject, encode(outcome), msg_id=once)

    async def _held(self, write: Callable[[], Awaitable[T]], what: str) -> T | None:
        """Retry `write` with backoff until it succeeds; None if the stage is stopping first.

        A nak would spend one of the message's deliveries (on an attempt that never ran, or,
        once they ran out, leaving the message in its stream for good). So it is held here
        (the keep-alive stops redelivery) until the server takes the write. MessageTooLarge is
        the caller's to handle.
        """
        try:
            return await patiently(write, f"{self.instance}: {what}", self._stopping.is_set,
                                   cap=10.0)  # fmt: skip
        except REFUSALS:
            raise
        except BusError:  # only once stopping
            return None

    async def _joined(self, affinity: Affinity) -> None:
        """Join the stage's membership, waiting out broker trouble (a server restarting while
        this instance starts) instead of ending the stage."""
        await patiently(affinity.start, f"{self.instance}: joining", self._stopping.is_set,
                        between=affinity.leave)  # fmt: skip

    async def _watch_for_lost(self, affinity: Affinity) -> None:
        """Get deliveries lost in transit back without waiting for ack_wait.

        When a cluster node dies, messages it was delivering to this instance are lost on the
        way; the server redelivers them only after `ack_wait`. Lost deliveries are known in
        two ways: a delivery number skipped for LOST_CHECK (later ones came), or, when nothing
        came after them, the consumer counting more deliveries un-acked than the instance
        holds at two looks half a second apart with nothing taken in or finished between
        (so no ack was still on its way) and no retry due. Either way it recreates its
        consumer (as a rebalance does), which hands them out again at once.
        """
        suspect: tuple[int, int, int] | None = None  # taken, finished, unaccounted at a look
        while True:
            await asyncio.sleep(LOST_CHECK)
            puller = affinity.puller
            quiet = not affinity.check_pending and affinity.owned and puller is not None
            if not quiet or self._stopping.is_set():
                suspect = None
                continue
            assert puller is not None
            missing = puller.missing_since()
            if missing is not None and time.monotonic() - missing >= LOST_CHECK:
                log.warning("%s: deliveries were lost on the way; recreating the consumer to "
                            "have them again", self.instance)  # fmt: skip
                affinity.check_consumer()
                suspect = None
                continue
            if puller.backlog or time.monotonic() < self._retries_due:
                suspect = None
                continue
            taken, finished, held = self._taken, self._finished, len(self._inflight)
            try:
                view = await self._bus.admin.consumer(self._stream, affinity.consumer_name)
            except BusError:
                continue
            unaccounted = view.state.ack_pending - held if view is not None else 0
            look = (taken, finished, unaccounted)
            if unaccounted <= 0 or (taken, finished) != (self._taken, self._finished):
                suspect = None
            elif suspect != look:  # first look, or something came or went meanwhile
                suspect = look
            else:
                log.warning("%s: %d deliveries were lost on the way; recreating the consumer "
                            "to have them again", self.instance, unaccounted)  # fmt: skip
                affinity.check_consumer()
                suspect = None

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


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Wait for `event`, at most `timeout` seconds."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
