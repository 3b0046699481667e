"""The stage runtime against the in-memory bus: acks, retries, dead letters, redelivery,
duplicates, drains and middleware, each in well under a second and without a nats-server.

The stages here run the handler `behave` of this module, which does what the request's input
says (`ok`, `fail-once`, `fail`, `reject`, `block`, `stall-once`), and note what they did on a
`Probe` that the test registered under a name and passed in the stage's options.
"""

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from shared import deadletter
from shared.components import Context
from shared.config import load_settings
from shared.deadletter import Entry
from shared.envelope import Envelope, Result, decode, encode, new_request
from shared.errors import (
    BusError,
    ConfigError,
    MessageTooLarge,
    Overloaded,
    SubjectTaken,
    TopologyError,
)
from shared.failure import Reject
from shared.middleware import Call, CallNext, Middleware, Outcome, Output
from shared.runtime import loop
from shared.runtime.group import StageGroup, declare
from shared.settings import Settings
from shared.topology import DLQ, RESULTS, Topology
from shared.transport.api import MSG_ID, BucketSpec, ConsumerSpec, StreamSpec
from shared.transport.memory import KV_OPERATION, MemoryBus, MemoryDelivery

HERE = "tests.unit.test_runtime"


# -- what the stages do, and what they saw ------------------------------------------------


@dataclass
class Probe:
    """Shared by a test and the stages and middleware it runs."""

    name: str
    calls: list[tuple[str, str, float]] = field(default_factory=list)
    """(stage, input, time.monotonic()) of each handler call, in order."""
    events: list[str] = field(default_factory=list)
    """Set-ups, tear-downs and the ends of blocking calls, in order."""
    release: asyncio.Event = field(default_factory=asyncio.Event)
    """Lets `block` calls finish."""
    stall: float = 0.0
    """How long a `stall-once` call blocks the event loop."""
    seen: list[tuple[str, str, int]] = field(default_factory=list)
    """(stage, input, attempt) of each call a middleware saw."""
    outcomes: list[tuple[str, str | None, Outcome]] = field(default_factory=list)
    """(stage, input or None, outcome) of each settlement a middleware saw."""
    options: list[dict[str, Any]] = field(default_factory=list)
    """The options each middleware instance was made with."""

    def count(self, text: str) -> int:
        """How many handler calls had input `text`."""
        return sum(1 for _, t, _ in self.calls if t == text)


PROBES: dict[str, Probe] = {}
_names = itertools.count()


@pytest.fixture
def probe() -> Iterator[Probe]:
    made = Probe(f"probe-{next(_names)}")
    PROBES[made.name] = made
    yield made
    del PROBES[made.name]


def behave(ctx: Context[dict[str, Any]]) -> contextlib.AbstractAsyncContextManager[Any]:
    """A stage factory whose handler does what the input says; set up and torn down."""
    probe, last = PROBES[ctx.options["probe"]], ctx.options.get("last", False)

    async def handle(request: Envelope) -> Envelope | Result:
        text = request.input
        earlier = probe.count(text)
        here = sum(1 for stage, t, _ in probe.calls if stage == ctx.stage and t == text)
        probe.calls.append((ctx.stage, text, time.monotonic()))
        if text == "reject":
            raise Reject("never")
        if text.startswith("reject-once") and not here:
            raise Reject("this time")
        if text.startswith("reject-later") and here:
            raise Reject("not any more")
        if text.startswith("fail-then-reject"):
            if here:
                raise Reject("now for good")
            raise RuntimeError("broken for now")
        if text == "fail" or (text == "fail-once" and not earlier):
            raise RuntimeError("broken")
        if text == "block":
            await probe.release.wait()
            probe.events.append(f"finished {ctx.stage}")
        if text == "stall-once" and not earlier:
            time.sleep(probe.stall)  # blocks the loop: no keep-alive can be sent meanwhile
            await until(lambda: probe.count(text) > 1)
        if text.startswith("sleep "):
            await asyncio.sleep(float(text.split()[1]))
        if text.startswith("grow ") and not last:  # add this many bytes for the next stage
            return request.with_data(**{ctx.stage: "x" * int(text.split()[1])})
        if not last:
            return request.with_data(**{ctx.stage: True})
        return Result(request_id=request.request_id, session_id=request.session_id,
                      output=f"done: {text}", created_at=request.created_at,
                      completed_at=time.time(), hops=request.hops)  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifecycle() -> AsyncIterator[Any]:
        probe.events.append(f"set up {ctx.stage}")
        try:
            yield handle
        finally:
            probe.events.append(f"tore down {ctx.stage}")

    return lifecycle()


class Recorder(Middleware):
    """Notes every call and every settlement on its probe."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    async def handle(self, call: Call, call_next: CallNext) -> Output:
        self.probe.seen.append((call.stage, call.request.input, call.attempt))
        return await call_next(call)

    def settled(self, stage: str, request: Envelope | None, outcome: Outcome) -> None:
        self.probe.outcomes.append((stage, request.input if request else None, outcome))


def recorder(ctx: Context[dict[str, Any]]) -> Recorder:
    """A middleware factory: a Recorder on the probe its options name."""
    probe = PROBES[ctx.options["probe"]]
    probe.options.append(dict(ctx.options))
    return Recorder(probe)


# -- running a pipeline on the memory bus -------------------------------------------------


async def held_is(pipe: Any, channel: str, n: int) -> bool:
    """Whether `channel`'s stream holds `n` messages."""
    return await pipe.held(channel) == n


async def until(condition: Callable[[], Any], timeout: float = 1.0) -> None:
    """Wait for `condition()` (a value or an awaitable) to be true, at most `timeout` s."""
    async with asyncio.timeout(timeout):
        while True:
            value = condition()
            if isinstance(value, Awaitable):
                value = await value
            if value:
                return
            await asyncio.sleep(0.005)


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """No ORCH_* variables from outside; the loop notices a stop within 20 ms, not 1 s."""
    for name in [n for n in os.environ if n.startswith("ORCH_") or n == "NATS_URL"]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(loop, "FETCH_WAIT", 0.02)


def settings_for(probe: Probe, stages: dict[str, dict[str, Any]], **overrides: Any) -> Settings:
    """Settings of a linear pipeline of `stages` (in order) running `behave`."""
    names = list(stages)
    graph = {
        "entry": names[0],
        "stages": {
            name: {
                "handler": f"{HERE}:behave",
                "next": names[i + 1] if i + 1 < len(names) else None,
                "options": {"probe": probe.name, "last": i + 1 == len(names)},
                **decl,
            }
            for i, (name, decl) in enumerate(stages.items())
        },
    }
    overrides.setdefault("affinity", {"heartbeat": 0.05, "failover_after": 0.2})
    return load_settings(graph=graph, partitions=2, **overrides)


class Pipe:
    """Stages of `settings` on a memory bus, with ways to feed and inspect them."""

    def __init__(self, settings: Settings, bus: MemoryBus) -> None:
        self.settings = settings
        self.topology = Topology(settings)
        self.bus = bus
        self.groups: list[StageGroup] = []

    def start(self, *stages: str, bus: MemoryBus | None = None) -> StageGroup:
        """Run `stages` (all when none are named) in a new group, on `bus` or the pipe's."""
        group = StageGroup(self.settings, stages or self.topology.graph.names, self.topology)
        group.start(bus or self.bus)
        self.groups.append(group)
        return group

    def stream(self, stage: str) -> str:
        """The input stream of `stage`."""
        return self.topology.stream_name(self.topology.graph[stage].channel)

    async def publish(self, text: str, session: str = "s", request_id: str | None = None) -> str:
        """Publish a request as a client does; return its id."""
        request = new_request(text, session, request_id=request_id)
        await self.bus.publish(self.topology.intake_subject(session), encode(request),
                               msg_id=f"{request.request_id}:client")  # fmt: skip
        return request.request_id

    async def results(self) -> list[Result]:
        """Every result stored, oldest first (not the outcomes of dead-lettered requests)."""
        stored = await self.all(RESULTS, "*")
        return [decode(m.data, Result, 1 << 20) for m in stored if b'"status":' not in m.data]

    async def dead_letters(self) -> list[Entry]:
        """Every dead-letter entry, oldest first."""
        return [Entry.parse(m.seq, m.data, m.headers) for m in await self.all(DLQ, "*.*")]

    async def all(self, channel: str, tail: str) -> list[Any]:
        """Every message stored in `channel`'s stream on subjects ending in `tail`."""
        stream, subject = (
            self.topology.stream_name(channel),
            f"{self.topology.prefix}.{channel}.{tail}",
        )
        out, seq = [], 1
        while msg := await self.bus.admin.message_at(stream, seq, subject):
            out.append(msg)
            seq = msg.seq + 1
        return out

    async def held(self, stage: str) -> int:
        """How many messages the input stream of `stage` holds."""
        return (await self.bus.admin.stream_state(self.stream(stage))).messages


@contextlib.asynccontextmanager
async def pipeline(settings: Settings) -> AsyncIterator[Pipe]:
    """A memory bus with the topology declared; every group started is stopped at the end."""
    async with MemoryBus() as bus:
        pipe = Pipe(settings, bus)
        await declare(bus, pipe.topology)
        try:
            yield pipe
        finally:
            for group in pipe.groups:
                await group.stop()


# -- the runtime --------------------------------------------------------------------------


async def test_a_message_is_handled_once_forwarded_with_its_id_and_deleted(probe):
    settings = settings_for(probe, {"a": {}, "b": {}})
    async with pipeline(settings) as pipe:
        pipe.start("a")
        rid = await pipe.publish("ok")
        await until(lambda: pipe.held("b"))
        stored = await pipe.bus.admin.last_message(pipe.stream("b"), "orch.b.*")
        assert stored is not None and stored.headers[MSG_ID] == f"{rid}:a"
        forwarded = decode(stored.data, Envelope, 1 << 20)
        assert (forwarded.request_id, forwarded.data) == (rid, {"a": True})
        assert [hop.stage for hop in forwarded.hops] == ["a"]
        intake = await pipe.bus.admin.stream_state(pipe.stream("a"))
        assert (intake.messages, intake.last_seq) == (0, 1)  # acked, so deleted

        pipe.start("b")
        await until(pipe.results)
        [result] = await pipe.results()
        assert (result.request_id, result.output) == (rid, "done: ok")
        last = await pipe.bus.admin.last_message(pipe.topology.stream_name(RESULTS), "orch.>")
        assert last is not None and last.headers[MSG_ID] == f"{rid}:b"
        assert await pipe.held("b") == 0
        assert [(s, t) for s, t, _ in probe.calls] == [("a", "ok"), ("b", "ok")]


async def test_a_failed_attempt_is_retried_after_its_backoff(probe):
    settings = settings_for(probe, {"a": {"backoff": [0.15]}})
    async with pipeline(settings) as pipe:
        pipe.start()
        await pipe.publish("fail-once")
        await until(pipe.results)
        first, second = (at for _, _, at in probe.calls)
        assert second - first >= 0.15
        assert await pipe.dead_letters() == []
        assert await pipe.held("a") == 0


async def test_reject_is_dead_lettered_at_once_with_its_headers(probe):
    settings = settings_for(probe, {"a": {}})
    async with pipeline(settings) as pipe:
        pipe.start()
        request = new_request("reject", "session ü/1")
        payload, subject = encode(request), pipe.topology.intake_subject("session ü/1")
        await pipe.bus.publish(subject, payload, msg_id="m1", headers={"traceparent": "00-x"})
        await until(pipe.dead_letters)
        [entry] = await pipe.dead_letters()
        assert entry.payload == payload
        assert (entry.reason, entry.stage, entry.subject) == ("failed", "a", subject)
        assert (entry.error, entry.delivered) == ("Reject: never", 1)
        assert (entry.request_id, entry.session_id) == (request.request_id, "session ü/1")
        assert entry.headers[deadletter.SESSION_ID] == "session %C3%BC/1"  # ASCII-safe
        assert entry.headers[deadletter.TRACEPARENT] == "00-x"
        assert abs(entry.failed_at - time.time()) < 5
        assert entry.headers[MSG_ID] == f"dlq:{pipe.stream('a')}:1"
        dlq = await pipe.bus.admin.last_message(pipe.topology.stream_name(DLQ), "orch.dlq.>")
        assert dlq is not None and dlq.subject == "orch.dlq.a.failed"
        assert probe.count("reject") == 1
        await until(lambda: held_is(pipe, "a", 0))  # acked once its outcome is stored too


async def test_a_handler_that_always_fails_is_dead_lettered_after_max_deliver_attempts(probe):
    settings = settings_for(probe, {"a": {"max_deliver": 3, "backoff": [0.01]}})
    async with pipeline(settings) as pipe:
        pipe.start()
        rid = await pipe.publish("fail")
        await until(pipe.dead_letters)
        [entry] = await pipe.dead_letters()
        assert (entry.reason, entry.error, entry.delivered) == ("failed", "RuntimeError: broken", 3)
        assert entry.request_id == rid
        assert probe.count("fail") == 3
        await until(lambda: held_is(pipe, "a", 0))  # gone: it cannot come back for a fourth try


async def test_attempts_waiting_for_a_retry_keep_counting_across_a_restart(probe):
    # A message waiting for its retry when its instance stops (or moves its partitions)
    # comes back to a new consumer as a first delivery: its earlier attempts must count.
    settings = settings_for(probe, {"a": {"max_deliver": 3, "backoff": [0.01, 0.3]}})
    async with pipeline(settings) as pipe:
        first = pipe.start()
        await pipe.publish("fail")
        await until(lambda: probe.count("fail") == 2)  # the second retry waits 0.3 s
        await first.stop()
        pipe.start()
        await until(pipe.dead_letters)
        [entry] = await pipe.dead_letters()
        assert probe.count("fail") == 3
        assert (entry.reason, entry.delivered) == ("failed", 3)


async def test_an_undecodable_message_is_dead_lettered_as_invalid_byte_for_byte(probe):
    settings = settings_for(probe, {"a": {}})
    async with pipeline(settings) as pipe:
        pipe.start()
        junk = b'\xff{"v": 1, not json'
        await pipe.bus.publish(pipe.topology.intake_subject("s"), junk, msg_id="junk")
        await until(pipe.dead_letters)
        [entry] = await pipe.dead_letters()
        assert entry.payload == junk
        assert (entry.reason, entry.stage, entry.delivered) == ("invalid", "a", 1)
        assert entry.error.startswith("not valid JSON")
        assert entry.request_id is None and entry.session_id is None
        assert probe.calls == []
        await until(lambda: held_is(pipe, "a", 0))


async def test_a_next_channel_full_for_longer_than_shed_after_sheds_as_backpressure(probe):
    settings = settings_for(probe, {"a": {"shed_after": 0.2}, "b": {"capacity": 1}})
    async with pipeline(settings) as pipe:
        await pipe.bus.publish(pipe.topology.subject_for("b", "s"), b"filler", msg_id="filler")
        pipe.start("a")
        rid = await pipe.publish("ok")
        await until(pipe.dead_letters)
        [entry] = await pipe.dead_letters()
        assert (entry.reason, entry.stage, entry.request_id) == ("backpressure", "a", rid)
        assert entry.error.startswith("Overloaded: stream for 'orch.b.")
        assert entry.error.endswith("is full: still full after 0.2s (stages.a.shed_after)")
        assert probe.count("ok") == 1
        await until(lambda: held_is(pipe, "a", 0))
        assert await pipe.held("b") == 1


async def test_limits_hold_a_request_at_the_intake_and_let_it_grow_after(probe):
    settings = settings_for(probe, {"a": {}, "b": {}}, max_message_bytes=4096)
    async with pipeline(settings) as pipe:
        pipe.start()
        grown = await pipe.publish("grow 20000")  # five times the intake's limit, after it
        big = await pipe.publish("y" * 5000)
        await until(pipe.results)
        await until(pipe.dead_letters)
        [result] = await pipe.results()
        assert (result.request_id, result.output) == (grown, "done: grow 20000")
        [entry] = await pipe.dead_letters()
        assert (entry.reason, entry.stage, entry.request_id) == ("invalid", "a", big)
        assert "over the limit of 4096" in entry.error


async def test_an_output_over_the_servers_limit_is_dead_lettered_at_once(probe):
    settings = settings_for(probe, {"a": {}, "b": {}})
    async with pipeline(settings) as pipe:
        pipe.start()
        rid = await pipe.publish(f"grow {pipe.bus.max_payload}")
        await until(pipe.dead_letters)
        [entry] = await pipe.dead_letters()
        assert (entry.reason, entry.stage, entry.request_id) == ("failed", "a", rid)
        assert entry.error.startswith("Reject: a's output is too large to pass on: ")
        assert "over the server's max_payload" in entry.error
        assert probe.count(f"grow {pipe.bus.max_payload}") == 1  # no retry can make it fit


async def test_an_intake_limit_the_server_cannot_carry_through_is_refused(probe):
    settings = settings_for(probe, {"a": {}}, max_message_bytes=400 * 1024)
    async with pipeline(settings) as pipe:
        with pytest.raises(
            ConfigError,
            match=r"max_message_bytes is 409600, over a third of "
            r"the server's max_payload \(1048576\).* at most 349525",
        ):
            pipe.start()


@pytest.fixture
def lost_acks(monkeypatch) -> list[str]:
    """The first ack of each intake message whose input contains `lose` fails, as when the
    connection drops (or the stage dies) right before it: the message comes back. Returns
    the inputs whose ack was lost."""
    lost: list[str] = []
    ack = MemoryDelivery.ack

    async def maybe_lost(self: MemoryDelivery) -> None:
        text = orjson.loads(self.data).get("input", "") if self.data else ""
        if ".intake." in self.subject and "lose" in text and text not in lost:
            lost.append(text)
            raise BusError("connection lost")
        await ack(self)

    monkeypatch.setattr(MemoryDelivery, "ack", maybe_lost)
    return lost


async def test_a_dead_letter_interrupted_before_the_ack_is_carried_out_not_retaken(
    probe, lost_acks
):
    settings = settings_for(probe, {"a": {"ack_wait": 0.2}, "b": {}})
    async with pipeline(settings) as pipe:
        pipe.start()
        rid = await pipe.publish("reject-once lose")
        await until(lambda: lost_acks)
        await until(lambda: held_is(pipe, "a", 0), timeout=3)
        [entry] = await pipe.dead_letters()
        assert (entry.request_id, entry.reason, entry.error) == (rid, "failed", "Reject: this time")
        assert probe.count("reject-once lose") == 1  # the redelivery was not handled afresh
        assert await pipe.results() == [] and await pipe.held("b") == 0


async def test_a_request_passed_on_before_is_not_dead_lettered_by_a_redelivery(probe, lost_acks):
    settings = settings_for(probe, {"a": {"ack_wait": 0.2}, "b": {}})
    async with pipeline(settings) as pipe:
        pipe.start()
        rid = await pipe.publish("reject-later lose")
        await until(pipe.results)
        await until(lambda: held_is(pipe, "a", 0), timeout=3)
        assert probe.count("reject-later lose") == 3  # a, b, and a's redelivery
        [result] = await pipe.results()
        assert result.request_id == rid
        assert await pipe.dead_letters() == []


async def test_a_last_stage_finds_its_result_before_dead_lettering_a_redelivery(probe, lost_acks):
    settings = settings_for(probe, {"a": {"ack_wait": 0.2}})
    async with pipeline(settings) as pipe:
        pipe.start()
        await pipe.publish("reject-later lose")
        await until(pipe.results)
        await until(lambda: held_is(pipe, "a", 0), timeout=3)
        assert probe.count("reject-later lose") == 2
        assert await pipe.dead_letters() == []


async def test_a_redelivery_that_never_went_on_is_dead_lettered_and_voided_downstream(probe):
    settings = settings_for(probe, {"a": {"backoff": [0.01]}, "b": {}})
    async with pipeline(settings) as pipe:
        pipe.start()
        rid = await pipe.publish("fail-then-reject")
        await until(pipe.dead_letters)
        [entry] = await pipe.dead_letters()
        assert (entry.request_id, entry.stage, entry.delivered) == (rid, "a", 2)
        await until(lambda: held_is(pipe, "b", 0))  # the void message b was sent is skipped
        assert [stage for stage, _, _ in probe.calls] == ["a", "a"]
        assert await pipe.results() == []


async def test_a_next_channel_that_frees_up_within_shed_after_loses_nothing(probe):
    settings = settings_for(probe, {"a": {"shed_after": 5}, "b": {"capacity": 1}})
    async with pipeline(settings) as pipe:
        await pipe.bus.publish(pipe.topology.subject_for("b", "s"), b"filler", msg_id="filler")
        pipe.start("a")
        rid = await pipe.publish("ok")
        await until(lambda: probe.count("ok") == 1)
        await asyncio.sleep(0.3)  # a holds its output while b's channel is full
        assert await pipe.held("a") == 1 and await pipe.dead_letters() == []
        pipe.start("b")  # b starts, dead-letters the filler and makes room
        await until(pipe.results, timeout=5)
        [result] = await pipe.results()
        assert result.request_id == rid and probe.count("ok") == 2  # a once, b once


async def test_a_broker_error_passing_an_output_on_is_retried_in_place(probe, monkeypatch):
    settings = settings_for(probe, {"a": {}, "b": {}})
    async with pipeline(settings) as pipe:
        publish, failures = pipe.bus.publish, []

        async def flaky(subject: str, data: bytes, **kw: Any) -> int:
            if ".b." in subject and len(failures) < 2:  # a leader election, twice
                failures.append(subject)
                raise BusError("no ack for publish")
            return await publish(subject, data, **kw)

        monkeypatch.setattr(pipe.bus, "publish", flaky)
        pipe.start()
        rid = await pipe.publish("ok")
        await until(pipe.results, timeout=5)
        assert [r.request_id for r in await pipe.results()] == [rid]
        assert len(failures) == 2 and probe.count("ok") == 2  # a's handler ran once
        assert await pipe.dead_letters() == []


async def test_a_stage_starting_while_the_broker_stumbles_waits_instead_of_ending(
    probe, monkeypatch
):
    settings = settings_for(probe, {"a": {}})
    async with pipeline(settings) as pipe:
        key_value, refused = pipe.bus.key_value, []

        async def stumbling(*args: Any, **kw: Any) -> Any:
            if len(refused) < 2:  # the server restarts as the stage joins
                refused.append(args[0])
                raise BusError("nats: timeout")
            return await key_value(*args, **kw)

        monkeypatch.setattr(pipe.bus, "key_value", stumbling)
        pipe.start()
        rid = await pipe.publish("ok")
        await until(pipe.results, timeout=5)
        assert [r.request_id for r in await pipe.results()] == [rid] and len(refused) == 2


async def test_the_keep_alive_holds_a_handler_that_outlives_ack_wait(probe):
    # The keep-alive ticks every ack_wait/3: ack_wait is large enough for a slow CI runner.
    settings = settings_for(probe, {"a": {"ack_wait": 0.24}})
    async with pipeline(settings) as pipe:
        pipe.start()
        await pipe.publish("sleep 0.45")
        await until(pipe.results)
        assert probe.count("sleep 0.45") == 1  # in_progress kept it from being redelivered


async def test_a_handler_that_blocks_past_ack_wait_is_redelivered_and_stored_once(probe):
    # A handler that blocks the event loop stops the keep-alive too: the server redelivers.
    probe.stall = 0.2
    settings = settings_for(probe, {"a": {"ack_wait": 0.1}})
    async with pipeline(settings) as pipe:
        pipe.start()
        rid = await pipe.publish("stall-once")

        async def handled_twice() -> bool:
            return probe.count("stall-once") == 2 and await pipe.held("a") == 0

        await until(handled_twice)
        await until(lambda: pipe.groups[0].runtime("a").in_flight == 0)  # both copies done
        assert [r.request_id for r in await pipe.results()] == [rid]
        results = await pipe.bus.admin.stream_state(pipe.topology.stream_name(RESULTS))
        assert results.last_seq == 1  # the second output was dropped as a duplicate
        assert await pipe.dead_letters() == []


async def test_a_stage_killed_after_storing_its_output_is_redelivered_and_the_copy_dropped(
    probe,
):
    settings = settings_for(probe, {"a": {}}, affinity={"heartbeat": 0.02, "failover_after": 0.1})
    async with pipeline(settings) as pipe:
        doomed = pipe.bus.connect()
        pipe.start(bus=doomed)
        watcher = await pipe.bus.subscribe(pipe.topology.result_subject("*"))
        rid = await pipe.publish("ok")
        assert await watcher.next_message(1.0) is not None
        await doomed.close()  # the process dies between storing the result and the ack
        assert await pipe.held("a") == 1

        survivor = pipe.start()  # its replacement takes over once the dead one falls silent

        async def redone() -> bool:
            return probe.count("ok") == 2 and await pipe.held("a") == 0

        await until(redone)
        await until(lambda: survivor.runtime("a").in_flight == 0)
        [result] = await pipe.results()
        assert result.request_id == rid
        assert result.hops[0].instance == pipe.groups[0].runtime("a").instance  # the first copy
        attempts = await pipe.bus.key_value(
            pipe.topology.bucket(pipe.topology.attempts_bucket(), 60)
        )
        assert await attempts.items("") == {}  # the loss was recorded, then settled


async def test_a_drain_past_its_timeout_cuts_the_handler_off_and_the_next_instance_redoes_it(
    probe,
):
    settings = settings_for(probe, {"a": {}}, drain_timeout=0.05)
    async with pipeline(settings) as pipe:
        first = pipe.start()
        rid = await pipe.publish("block")
        await until(lambda: first.runtime("a").in_flight)
        await first.stop()
        assert not first.running and first.runtime("a").in_flight == 0
        assert await pipe.bus.admin.consumers(pipe.stream("a")) == []  # handed over
        assert await pipe.held("a") == 1 and await pipe.results() == []

        probe.release.set()
        pipe.start()
        await until(pipe.results)
        assert [r.request_id for r in await pipe.results()] == [rid]
        assert probe.count("block") == 2


async def test_the_same_request_published_twice_is_handled_once(probe):
    settings = settings_for(probe, {"a": {}, "b": {}})
    async with pipeline(settings) as pipe:
        pipe.start()
        subject = pipe.topology.intake_subject("s")

        async def send() -> int:  # a client retrying: a new request object, the same id
            request = new_request("ok", "s", request_id="r1")
            return await pipe.bus.publish(subject, encode(request), msg_id="r1:client")

        assert [await send(), await send()] == [1, 1]
        await until(pipe.results)
        assert await send() == 1  # after it was handled (and deleted) too
        intake = await pipe.bus.admin.stream_state(pipe.stream("a"))
        assert (intake.messages, intake.last_seq) == (0, 1)
        assert [r.request_id for r in await pipe.results()] == ["r1"]
        assert [(s, t) for s, t, _ in probe.calls] == [("a", "ok"), ("b", "ok")]


async def test_stop_finishes_the_message_in_flight_acks_it_and_tears_down(probe):
    settings = settings_for(probe, {"a": {}})
    async with pipeline(settings) as pipe:
        group = pipe.start()
        await pipe.publish("block")
        runtime = group.runtime("a")
        await until(lambda: runtime.in_flight == 1)
        [delivery] = runtime.deliveries()
        assert delivery.delivered == 1
        stopping = asyncio.create_task(group.stop())
        await until(lambda: runtime.last_loop < time.monotonic() - 0.1)  # the loop has ended
        assert not stopping.done() and group.running  # still draining
        probe.release.set()
        async with asyncio.timeout(1):
            await stopping
        assert not group.running and runtime.in_flight == 0
        assert probe.events == ["set up a", "finished a", "tore down a"]
        assert len(await pipe.results()) == 1
        assert await pipe.held("a") == 0
        assert await pipe.bus.admin.consumers(pipe.stream("a")) == []
        members = await pipe.bus.key_value(pipe.topology.members())
        assert await members.items("") == {}  # it said goodbye


async def test_middleware_sees_every_call_and_every_outcome(probe):
    middleware = [{"factory": f"{HERE}:recorder", "options": {"probe": probe.name, "n": 1}}]
    stages = {"a": {"max_deliver": 2, "backoff": [0.01]}}
    settings = settings_for(probe, stages, middleware=middleware)
    async with pipeline(settings) as pipe:
        pipe.start()
        for text in ("ok", "fail-once", "reject"):
            await pipe.publish(text)
        await pipe.bus.publish(pipe.topology.intake_subject("s"), b"[]", msg_id="junk")
        await until(lambda: len(probe.outcomes) == 5)
        assert probe.options == [{"probe": probe.name, "n": 1}]
        assert sorted(probe.seen) == [("a", "fail-once", 1), ("a", "fail-once", 2),
                                      ("a", "ok", 1), ("a", "reject", 1)]  # fmt: skip
        settled = {(text, o.action, o.to, o.reason, o.error, o.delay)
                   for _, text, o in probe.outcomes}  # fmt: skip
        assert settled == {
            ("ok", "forwarded", None, None, None, None),
            ("fail-once", "retried", None, None, "RuntimeError: broken", 0.01),
            ("fail-once", "forwarded", None, None, None, None),
            ("reject", "dead_lettered", None, "failed", "Reject: never", None),
            (None, "dead_lettered", None, "invalid", "expected a JSON object, got list", None),
        }
        assert all(stage == "a" and o.seconds >= 0 for stage, _, o in probe.outcomes)


# -- the memory bus itself ----------------------------------------------------------------


def stream_spec(name: str = "S", **changes: Any) -> StreamSpec:
    base: dict[str, Any] = dict(
        name=name, subjects=(f"{name.lower()}.*",), retention="workqueue", discard="new",
        max_msgs=-1, max_bytes=-1, max_age=0.0, max_msg_size=-1, max_msgs_per_subject=-1,
        storage="memory", replicas=1, duplicate_window=120.0,
    )  # fmt: skip
    return StreamSpec(**{**base, **changes})


def consumer_spec(name: str = "c", subjects: tuple[str, ...] = ("s.*",), **changes: Any):
    base: dict[str, Any] = dict(stream="S", durable=name, filter_subjects=subjects,
                                max_ack_pending=100, ack_wait=30.0, max_deliver=5)  # fmt: skip
    return ConsumerSpec(**{**base, **changes})


@pytest.fixture
async def bus() -> AsyncIterator[MemoryBus]:
    async with MemoryBus() as made:
        yield made


async def test_bus_work_queue_deletes_a_message_when_it_is_acked(bus):
    await bus.admin.ensure_stream(stream_spec())
    core = await bus.subscribe("s.>")
    assert [await bus.publish("s.1", b"x", msg_id=i) for i in "ab"] == [1, 2]
    seen = [await core.next_message(0.1) for _ in "ab"]
    assert [m and m.headers[MSG_ID] for m in seen] == ["a", "b"]  # core subscribers get them
    await bus.admin.ensure_consumer(consumer_spec())
    puller = await bus.pull(consumer_spec())
    first, second = await puller.fetch(10, 0.1)
    assert (first.stream_seq, first.delivered, first.headers[MSG_ID]) == (1, 1, "a")
    await first.ack()
    state = await bus.admin.stream_state("S")
    assert (state.messages, state.last_seq) == (1, 2)
    view = await bus.admin.consumer("S", "c")
    assert view is not None and (view.state.ack_pending, view.state.ack_floor) == (1, 1)
    assert view.state.delivered == 2
    await second.ack()
    assert (await bus.admin.stream_state("S")).messages == 0
    with pytest.raises(BusError, match="no stream stores"):
        await bus.publish("nowhere", b"", msg_id="x")
    with pytest.raises(MessageTooLarge):
        await bus.publish("s.1", bytes(bus.max_payload), msg_id="big")


async def test_bus_full_stream_refuses_under_discard_new_and_drops_under_discard_old(bus):
    await bus.admin.ensure_stream(stream_spec(max_msgs=2))
    await bus.admin.ensure_stream(stream_spec("T", retention="limits", discard="old", max_msgs=2))
    for i in range(2):
        await bus.publish("s.1", b"x", msg_id=f"s{i}")
    with pytest.raises(Overloaded) as refused:
        await bus.publish("s.1", b"x", msg_id="s2")
    assert refused.value.subject == "s.1"
    state = await bus.admin.stream_state("S")
    assert (state.messages, state.last_seq) == (2, 2)  # nothing stored
    for i in range(3):
        await bus.publish("t.1", str(i).encode(), msg_id=f"t{i}")
    first = await bus.admin.message_at("T", 1, "t.*")
    assert first is not None and (first.seq, first.data) == (2, b"1")


async def test_bus_drops_a_duplicate_within_the_window_only(bus):
    await bus.admin.ensure_stream(stream_spec(duplicate_window=0.05))
    start = time.monotonic()
    assert await bus.publish("s.1", b"x", msg_id="same") == 1
    assert await bus.publish("s.1", b"y", msg_id="same") == 1
    assert await bus.publish("s.1", b"z", msg_id="other") == 2
    seq = 1
    async with asyncio.timeout(1):
        while seq == 1:
            seq = await bus.publish("s.1", b"w", msg_id="same")
    assert seq == 3 and time.monotonic() - start >= 0.05


async def test_bus_redelivers_after_a_nak_delay_or_the_ack_wait(bus):
    await bus.admin.ensure_stream(stream_spec())
    spec = consumer_spec(ack_wait=0.05)
    await bus.admin.ensure_consumer(spec)
    await bus.publish("s.1", b"x", msg_id="a")
    puller = await bus.pull(spec)
    [first] = await puller.fetch(1, 0.1)
    naked = time.monotonic()
    await first.nak(delay=0.1)
    [second] = await puller.fetch(1, 1.0)
    assert time.monotonic() - naked >= 0.1 and second.delivered == 2
    [third] = await puller.fetch(1, 1.0)  # not acked within ack_wait
    assert third.delivered == 3
    await third.nak()
    [fourth] = await puller.fetch(1, 0.1)  # at once
    view = await bus.admin.consumer("S", "c")
    assert fourth.delivered == 4 and view is not None and view.state.redelivered == 1


async def test_bus_stops_delivering_after_max_deliver_and_keeps_the_message(bus):
    await bus.admin.ensure_stream(stream_spec())
    spec = consumer_spec(max_deliver=2)
    await bus.admin.ensure_consumer(spec)
    await bus.publish("s.1", b"x", msg_id="a")
    puller = await bus.pull(spec)
    for n in (1, 2):
        [delivery] = await puller.fetch(1, 0.1)
        assert delivery.delivered == n
        await delivery.nak()
    assert await puller.fetch(1, 0.05) == []
    assert (await bus.admin.stream_state("S")).messages == 1
    view = await bus.admin.consumer("S", "c")
    assert view is not None
    assert (view.state.ack_pending, view.state.ack_floor, view.state.redelivered) == (0, 0, 1)


async def test_bus_keeps_un_acked_deliveries_under_max_ack_pending(bus):
    await bus.admin.ensure_stream(stream_spec())
    spec = consumer_spec(max_ack_pending=2)
    await bus.admin.ensure_consumer(spec)
    for i in range(4):
        await bus.publish(f"s.{i}", b"x", msg_id=str(i))
    puller = await bus.pull(spec)
    got = await puller.fetch(10, 0.05)
    assert [d.stream_seq for d in got] == [1, 2]
    assert await puller.fetch(10, 0.02) == []
    await got[0].ack()
    assert [d.stream_seq for d in await puller.fetch(10, 0.05)] == [3]


async def test_bus_refuses_overlapping_consumers_on_a_work_queue(bus):
    await bus.admin.ensure_stream(stream_spec())
    await bus.admin.ensure_stream(stream_spec("L", retention="limits"))
    assert await bus.admin.ensure_consumer(consumer_spec("a", ("s.1", "s.2"))) == "created"
    with pytest.raises(SubjectTaken):
        await bus.admin.ensure_consumer(consumer_spec("b", ("s.*",)))
    with pytest.raises(SubjectTaken):
        await bus.admin.ensure_consumer(consumer_spec("b", ()))  # the whole stream
    assert await bus.admin.ensure_consumer(consumer_spec("b", ("s.3",))) == "created"
    assert await bus.admin.ensure_consumer(consumer_spec("a", ("s.1", "s.2"))) == "unchanged"
    changed = await bus.admin.ensure_consumer(consumer_spec("a", ("s.1",), max_deliver=3))
    assert changed.startswith("updated (") and "max_deliver: 5 -> 3" in changed
    with pytest.raises(TopologyError, match="not stored by the stream"):
        await bus.admin.ensure_consumer(consumer_spec("x", ("elsewhere.1",)))
    for name in "xy":  # a limits stream lets consumers share subjects
        await bus.admin.ensure_consumer(consumer_spec(name, ("l.*",), stream="L"))
    assert await bus.admin.delete_consumer("S", "b")
    assert not await bus.admin.delete_consumer("S", "b")
    assert await bus.admin.ensure_consumer(consumer_spec("b", ("s.2", "s.3"))) == "created"


async def test_bus_deleting_a_consumer_ends_its_pull_and_frees_its_messages(bus):
    await bus.admin.ensure_stream(stream_spec())
    spec = consumer_spec()
    await bus.admin.ensure_consumer(spec)
    await bus.publish("s.1", b"x", msg_id="a")
    puller = await bus.pull(spec)
    [held] = await puller.fetch(1, 0.1)
    waiting = asyncio.create_task(puller.fetch(1, 1.0))

    async def pull_waiting() -> bool:
        view = await bus.admin.consumer("S", "c")
        return view is not None and view.state.waiting == 1

    await until(pull_waiting)
    assert await bus.admin.delete_consumer("S", "c")
    with pytest.raises(BusError, match="consumer deleted"):
        await waiting
    await held.ack()  # its consumer is gone: nothing happens, nothing breaks
    assert (await bus.admin.stream_state("S")).messages == 1
    await bus.admin.ensure_consumer(spec)
    puller.reset()
    [again] = await puller.fetch(1, 0.1)
    assert (again.stream_seq, again.delivered) == (1, 1)


async def test_bus_key_value_entries_expire_and_changes_reach_subscribers(bus):
    kv = await bus.key_value(BucketSpec("B", ttl=0.05, storage="memory"))
    sub = await bus.subscribe(kv.subject("x.*"))
    assert await kv.create("x.1", b"one")
    assert not await kv.create("x.1", b"again")
    await kv.put("x.2", b"two")
    assert await kv.items("x.") == {"x.1": b"one", "x.2": b"two"}
    await kv.delete("x.1")
    assert not await kv.exists("x.1")
    seen = [await sub.next_message(0.1) for _ in range(3)]
    assert [(m.subject, m.data) for m in seen if m] == [
        ("$KV.B.x.1", b"one"), ("$KV.B.x.2", b"two"), ("$KV.B.x.1", b"")
    ]  # fmt: skip
    assert [m.headers.get(KV_OPERATION) for m in seen if m] == [None, None, "DEL"]

    async def expired() -> bool:
        return not await kv.exists("x.2")

    await until(expired)  # ttl after its put


async def test_bus_counts_watches_and_reads_back(bus):
    await bus.admin.ensure_stream(stream_spec("C", retention="limits", discard="old",
                                              subjects=("c.>",), counter=True))  # fmt: skip
    await bus.increment("c.x", 2, msg_id="one")
    await bus.increment("c.x", 3, msg_id="two")
    await bus.increment("c.x", 3, msg_id="two")  # the same increment again: counted once
    await bus.increment("c.y", -1, msg_id="three")
    assert await bus.admin.counter("C", "c.x") == 5
    assert await bus.admin.counter("C", "c.none") == 0
    assert await bus.admin.subject_counts("C", "c.*") == {"c.x": 2, "c.y": 1}
    watched = bus.watch("c.x")
    assert [(await anext(watched)).seq for _ in range(2)] == [1, 2]
    later = asyncio.create_task(anext(watched))
    await bus.increment("c.x", 1, msg_id="four")
    async with asyncio.timeout(1):
        assert (await later).seq == 4
    at = await bus.admin.message_at("C", 2, "c.y")
    assert at is not None and at.seq == 3
    assert await bus.admin.delete("C", 3) and not await bus.admin.delete("C", 3)
    await watched.aclose()


def talker(ctx: Context[dict[str, Any]]) -> Any:
    """A streaming stage factory: yields the input's words as pieces ("RESTART" starts the
    answer over), then the result."""

    async def handle(request: Envelope) -> AsyncIterator[Any]:
        from shared.stage import Partial

        said = []
        for word in request.input.split():
            await asyncio.sleep(0.002)
            if word == "RESTART":
                said = []
                yield Partial("", restart=True)
                continue
            said.append(word)
            yield Partial(word + " ")
        yield Result(request_id=request.request_id, session_id=request.session_id,
                     output=" ".join(said), created_at=request.created_at,
                     completed_at=time.time(), hops=request.hops)  # fmt: skip

    return handle


async def tokens_of(pipe: "Pipe", request_id: str) -> list[dict[str, Any]]:
    import orjson

    stream = pipe.topology.stream_name("tokens")
    subject = pipe.topology.token_subject(request_id)
    out, seq = [], 1
    while msg := await pipe.bus.admin.message_at(stream, seq, subject):
        out.append(orjson.loads(msg.data))
        seq = msg.seq + 1
    return out


async def test_a_streaming_handler_publishes_its_pieces_for_requests_that_ask(probe):
    graph = {"entry": "a", "stages": {"a": {"handler": f"{HERE}:talker"}}}
    settings = load_settings(graph=graph, partitions=1, tokens={"window": 0.02},
                             affinity={"heartbeat": 0.05, "failover_after": 0.2})  # fmt: skip
    async with pipeline(settings) as pipe:
        pipe.start()
        words = " ".join(f"w{i}" for i in range(30))
        asked = new_request(words, "s", stream=True)
        quiet = new_request(words, "s")
        for request in (asked, quiet):
            await pipe.bus.publish(pipe.topology.intake_subject("s"), encode(request),
                                   msg_id=f"{request.request_id}:client")  # fmt: skip
        async with asyncio.timeout(2):
            while len(await pipe.results()) < 2:
                await asyncio.sleep(0.01)
        streamed = await tokens_of(pipe, asked.request_id)
        assert await tokens_of(pipe, quiet.request_id) == []  # it did not ask
    *pieces, last = streamed
    assert last == {"request_id": asked.request_id, "generation": 0, "seq": len(pieces),
                    "done": True}  # fmt: skip
    assert [m["seq"] for m in pieces] == list(range(len(pieces)))
    assert pieces[0]["text"] == "w0 "  # the first piece at once
    assert 1 < len(pieces) < 30  # then batched
    assert "".join(m["text"] for m in pieces) == words + " "


async def test_a_restart_starts_a_new_generation_of_the_token_stream(probe):
    graph = {"entry": "a", "stages": {"a": {"handler": f"{HERE}:talker"}}}
    settings = load_settings(graph=graph, partitions=1, tokens={"window": 0.0},
                             affinity={"heartbeat": 0.05, "failover_after": 0.2})  # fmt: skip
    async with pipeline(settings) as pipe:
        pipe.start()
        request = new_request("old text RESTART new text", "s", stream=True)
        await pipe.bus.publish(pipe.topology.intake_subject("s"), encode(request),
                               msg_id="m")  # fmt: skip
        await until(pipe.results)
        streamed = await tokens_of(pipe, request.request_id)
    texts = [(m["generation"], m.get("text")) for m in streamed]
    assert texts == [(0, "old "), (0, "text "), (1, "new "), (1, "text "), (1, None)]
