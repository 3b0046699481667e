"""`orchestrator status --watch`: every stage instance's figures over the last interval.

A `Sample` is the pipeline at one moment: what each stage instance reports of itself over the
NATS micro protocol (`$SRV.STATS`: partitions, counters, cumulative latency histograms), what
JetStream says of its consumer (messages waiting, un-acked), and the pipeline's `Status`. Two
samples make a `Frame`: rates and percentiles over the time between them (counters and
histogram buckets subtract), which `render` draws as a table and `Frame.to_dict` gives as
JSON.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Protocol

import orjson

from shared.errors import BusError
from shared.metrics import quantile
from shared.status import StageStatus, Status, consumer_views, counts_line, read_status
from shared.topology import Topology
from shared.transport.api import ConsumerView, MessageBus, StoredMessage

QUIET = 0.5
"""Seconds without a new stats reply after which every instance is taken to have answered."""
LONGEST = 5.0
"""Seconds at most to gather stats replies, however many keep coming."""
GIVE_UP = 1.0
"""Seconds at most to wait for a cancelled task to finish."""
OUTCOMES = ("forwarded", "dead_lettered", "retried")
HANDLER, QUEUE_WAIT, END_TO_END = (
    "handler_duration_seconds",
    "queue_wait_seconds",
    "request_duration_seconds",
)

Buckets = tuple[tuple[float | str, float], ...]
"""Cumulative histogram buckets: `(upper_bound, count)`, the last bound "+Inf"."""


class StatsBus(MessageBus, Protocol):
    """A bus that can also send a request answered by any number of replies."""

    def request_stream(
        self, subject: str, data: bytes, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[StoredMessage]:
        """Send a request and yield its replies as they come."""
        ...


@dataclass(frozen=True)
class InstanceSample:
    """One stage instance at one moment: its own report and its consumer's state."""

    stage: str
    instance: str
    partitions: tuple[int, ...]
    ready: bool
    answered: bool
    """False for a consumer whose instance did not answer (stopped, or stuck)."""
    queued: int | None
    """Messages waiting in its consumer; None when it has none (it owns no partition)."""
    ack_pending: int | None
    messages: dict[str, float] | None
    """Messages settled, by outcome, since the instance started; None without metrics."""
    dead_letters: dict[str, float]
    histograms: dict[str, Buckets]


@dataclass(frozen=True)
class Sample:
    """The pipeline at one moment."""

    at: float
    """time.monotonic() when it was taken."""
    time: float
    instances: tuple[InstanceSample, ...]
    status: Status


@dataclass(frozen=True)
class Row:
    """One instance's figures over an interval (None: not known, or nothing happened)."""

    stage: str
    instance: str
    partitions: tuple[int, ...]
    ready: bool
    answered: bool
    queued: int | None
    ack_pending: int | None
    forwarded_per_s: float | None
    dead_lettered_per_s: float | None
    retried_per_s: float | None
    handler_p50_ms: float | None
    handler_p99_ms: float | None
    queue_wait_p99_ms: float | None
    end_to_end_p50_ms: float | None
    end_to_end_p99_ms: float | None
    last: bool
    """The stage stores results: end-to-end latency is measured here."""


@dataclass(frozen=True)
class Frame:
    """What one refresh shows: a row per instance, dead letters by reason, the accounts."""

    time: float
    interval: float | None
    """Seconds between the two samples; None for the first, which has no rates."""
    rows: tuple[Row, ...]
    dead_letters: dict[str, int]
    """By reason: the totals the running instances counted since they started."""
    status: Status

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form: the same figures as the table."""
        counts = {s.stage: 0 for s in self.status.stages}
        for row in self.rows:
            counts[row.stage] = counts.get(row.stage, 0) + 1
        return {
            "time": self.time,
            "interval": self.interval,
            "instances": [asdict(row) for row in self.rows],
            "stages": [
                {
                    "stage": s.stage,
                    "queued": s.queued,
                    "ack_pending": s.ack_pending,
                    "instances": counts[s.stage],
                }
                for s in self.status.stages
            ],
            "dead_letters": self.dead_letters,
            "accounts": self.status.to_dict()["accounts"],
        }


async def stats_replies(
    bus: StatsBus, subject: str, quiet: float = QUIET, longest: float = LONGEST
) -> list[dict[str, Any]]:
    """Every reply to one request on `subject`, until `quiet` seconds pass without one (or
    `longest` in all); none when nothing serves the subject."""
    loop = asyncio.get_running_loop()
    replies: list[dict[str, Any]] = []
    heard = started = loop.time()

    async def read() -> None:
        nonlocal heard
        async for msg in bus.request_stream(subject, b""):
            heard = loop.time()
            try:
                replies.append(orjson.loads(msg.data))
            except orjson.JSONDecodeError:
                continue

    reader = asyncio.create_task(read(), name="stats-replies")
    try:
        while not reader.done():
            wait = min(heard + quiet, started + longest) - loop.time()
            if wait <= 0:
                break
            await asyncio.wait({reader}, timeout=wait)
    finally:
        reader.cancel()
        # Bounded: a cancellation can get lost inside nats-py (its flush swallows
        # CancelledError), leaving the reader waiting for replies that will not come.
        await asyncio.wait({reader}, timeout=GIVE_UP)
    # A BusError here is the server's "no responders": no instance runs.
    failed = reader.done() and not reader.cancelled() and reader.exception()
    if failed and not isinstance(failed, BusError):
        raise failed
    return replies


def reports(topology: Topology, replies: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The instances' own reports among stats replies: those of this pipeline's stages
    (whose endpoint is on its status subject; other pipelines may share the server)."""
    out = []
    for reply in replies:
        endpoints = reply.get("endpoints") or [{}]
        data = endpoints[0].get("data") if isinstance(endpoints[0], dict) else None
        if not isinstance(data, dict) or not {"stage", "instance"} <= data.keys():
            continue
        if endpoints[0].get("subject") != topology.status_subject(str(data["instance"])):
            continue
        if data["stage"] in topology.graph.names:
            out.append(data)
    return out


def instances(
    topology: Topology, found: list[dict[str, Any]], views: Mapping[str, list[ConsumerView]]
) -> list[InstanceSample]:
    """Every instance, stage by stage in graph order: those that reported (`found`), then
    consumers no reporting instance owns; `views` are each stage's consumers."""
    out = []
    for stage in topology.graph:
        consumers = {v.name: v for v in views.get(stage.name, [])}
        mine = sorted((r for r in found if r["stage"] == stage.name), key=lambda r: r["instance"])
        for report in mine:
            view = consumers.pop(topology.consumer_name(stage.name, report["instance"]), None)
            out.append(_reported(report, view))
        for name, view in sorted(consumers.items()):
            if (instance := topology.instance_of_consumer(stage.name, name)) is not None:
                owned = {topology.partition_of_subject(s) for s in view.subjects} - {None}
                out.append(InstanceSample(stage.name, instance,
                                          tuple(sorted(p for p in owned if p is not None)),
                                          False, False, view.state.pending,
                                          view.state.ack_pending, None, {}, {}))  # fmt: skip
    return out


def _reported(report: Mapping[str, Any], view: ConsumerView | None) -> InstanceSample:
    messages = report.get("messages")
    return InstanceSample(
        stage=str(report["stage"]),
        instance=str(report["instance"]),
        partitions=tuple(sorted(int(p) for p in report.get("partitions") or [])),
        ready=bool(report.get("ready", False)),
        answered=True,
        queued=view.state.pending if view else None,
        ack_pending=view.state.ack_pending if view else None,
        messages={k: float(v) for k, v in messages.items()} if isinstance(messages, dict) else None,
        dead_letters={k: float(v) for k, v in (report.get("dead_letters") or {}).items()},
        histograms={
            name: tuple((b, float(n)) for b, n in report[name]["buckets"])
            for name in (HANDLER, QUEUE_WAIT, END_TO_END)
            if isinstance(report.get(name), dict)
        },
    )


async def collect(bus: StatsBus, topology: Topology, service: str) -> Sample:
    """The pipeline now: the stats of every instance of micro service `service`, each stage's
    consumers, and the status."""
    at, now = time.monotonic(), time.time()
    asked = asyncio.create_task(stats_replies(bus, f"$SRV.STATS.{service}"))
    try:
        views = await consumer_views(bus, topology)
        status = await read_status(bus, topology, views)
        replies = await asked
    finally:
        asked.cancel()
    return Sample(at, now, tuple(instances(topology, reports(topology, replies), views)), status)


def grown(before: float, after: float) -> float:
    """How much a counter grew; all of `after` when it went down (restarted meanwhile)."""
    return after - before if after >= before else after


def bucket_delta(before: Buckets | None, after: Buckets) -> Buckets:
    """The observations between two readings of one histogram, as cumulative buckets."""
    if before is None or [b for b, _ in before] != [b for b, _ in after]:
        return after
    delta = tuple((bound, n - m) for (bound, n), (_, m) in zip(after, before, strict=True))
    return after if any(n < 0 for _, n in delta) else delta


def between(previous: Sample | None, current: Sample) -> Frame:
    """Rates and percentiles of each instance over the time from `previous` to `current`
    (none for an instance `previous` did not have)."""
    interval = current.at - previous.at if previous is not None else None
    before = {(s.stage, s.instance): s for s in previous.instances} if previous else {}
    rows = tuple(_row(before.get((s.stage, s.instance)), s, interval) for s in current.instances)
    reasons: dict[str, int] = {}
    for sample in current.instances:
        for reason, n in sample.dead_letters.items():
            reasons[reason] = reasons.get(reason, 0) + round(n)
    return Frame(current.time, interval, rows, dict(sorted(reasons.items())), current.status)


def _row(before: InstanceSample | None, now: InstanceSample, interval: float | None) -> Row:
    rates: dict[str, float | None] = dict.fromkeys(OUTCOMES)
    if before and interval and before.messages is not None and now.messages is not None:
        rates = {
            o: grown(before.messages.get(o, 0.0), now.messages.get(o, 0.0)) / interval
            for o in OUTCOMES
        }

    def ms(name: str, q: float) -> float | None:
        if before is None or not interval or name not in now.histograms:
            return None
        seconds = quantile(
            [list(b) for b in bucket_delta(before.histograms.get(name), now.histograms[name])], q
        )
        return None if seconds is None else seconds * 1000

    return Row(now.stage, now.instance, now.partitions, now.ready, now.answered, now.queued,
               now.ack_pending, rates["forwarded"], rates["dead_lettered"], rates["retried"],
               ms(HANDLER, 0.5), ms(HANDLER, 0.99), ms(QUEUE_WAIT, 0.99), ms(END_TO_END, 0.5),
               ms(END_TO_END, 0.99), END_TO_END in now.histograms)  # fmt: skip


COLUMNS = ("stage", "instance", "partitions", "queued", "ack-pending", "fwd/s", "dead/s",
           "retry/s", "handler-p50", "handler-p99", "wait-p99", "e2e-p50", "e2e-p99")  # fmt: skip
"""The table's columns; latencies in ms."""


def render(frame: Frame) -> str:
    """The frame as a plain-text table, the dead letters by reason and the accounts."""
    when = datetime.fromtimestamp(frame.time).strftime("%Y-%m-%d %H:%M:%S")
    over = (
        f"rates and percentiles over the last {frame.interval:.1f}s, latencies in ms"
        if frame.interval
        else "rates and percentiles from the next refresh on"
    )
    table = [list(COLUMNS)]
    by_stage: dict[str, list[Row]] = {}
    for row in frame.rows:
        by_stage.setdefault(row.stage, []).append(row)
    for stage in frame.status.stages:
        table += [_cells(row) for row in by_stage.pop(stage.stage, [])] or [_idle(stage)]
    table += [_cells(row) for rows in by_stage.values() for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    # No blank line inside: one marks the start of the next refresh where output is a file.
    lines = [f"{when}   {over}"]
    for cells in table:
        left = [c.ljust(w) for c, w in zip(cells[:3], widths, strict=False)]
        right = [c.rjust(w) for c, w in zip(cells[3:], widths[3:], strict=True)]
        lines.append("  ".join(left + right).rstrip())
    dead = ", ".join(f"{reason} {n}" for reason, n in frame.dead_letters.items()) or "none"
    lines += [f"dead letters by reason (running instances' totals): {dead}",
              counts_line(frame.status)]  # fmt: skip
    return "\n".join(lines)


def _cells(row: Row) -> list[str]:
    note = "" if row.ready else " (no answer)" if not row.answered else " (not ready)"
    end_to_end = [_ms(row.end_to_end_p50_ms), _ms(row.end_to_end_p99_ms)] if row.last else ["", ""]
    return [row.stage, row.instance + note, _partitions(row.partitions), _count(row.queued),
            _count(row.ack_pending), _rate(row.forwarded_per_s), _rate(row.dead_lettered_per_s),
            _rate(row.retried_per_s), _ms(row.handler_p50_ms), _ms(row.handler_p99_ms),
            _ms(row.queue_wait_p99_ms), *end_to_end]  # fmt: skip


def _idle(stage: StageStatus) -> list[str]:
    return [stage.stage, "(no instance running)", "", str(stage.queued), str(stage.ack_pending),
            *[""] * (len(COLUMNS) - 5)]  # fmt: skip


def compact(partitions: Iterable[int]) -> str:
    """Partitions as ranges: `0-3,6`."""
    runs: list[list[int]] = []
    for p in sorted(partitions):
        if runs and p == runs[-1][1] + 1:
            runs[-1][1] = p
        else:
            runs.append([p, p])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _partitions(owned: tuple[int, ...]) -> str:
    return f"{len(owned)} [{compact(owned)}]" if owned else "0"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


async def watch(
    bus: StatsBus,
    topology: Topology,
    service: str,
    interval: float,
    show: Callable[[Frame], None],
    trouble: Callable[[str], None],
    stop: asyncio.Event | None = None,
) -> None:
    """Sample every `interval` seconds and `show` each frame, until `stop` is set (or the
    task is cancelled). A sample that fails after the first is reported to `trouble` and
    tried again at the next refresh; once `stop` is set nothing more is shown or reported."""
    stop = stop or asyncio.Event()
    previous: Sample | None = None
    while not stop.is_set():
        started = time.monotonic()
        try:
            current = await collect(bus, topology, service)
        except (BusError, TimeoutError) as exc:
            # Stopped meanwhile, the connection may be closing under the request: that is
            # no trouble to report. (A cancellation alone may be lost: Python 3.11's
            # wait_for, which nats-py's requests use, drops one that meets a reply.)
            if stop.is_set():
                return
            if previous is None:
                raise
            trouble(f"cannot read the pipeline's state ({exc}); trying again")
        else:
            if stop.is_set():
                return
            show(between(previous, current))
            previous = current
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, started + interval - time.monotonic())):
                await stop.wait()
