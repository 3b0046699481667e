"""The pure parts of `status --watch`: figures between two samples, the table, and when the
refresh loop reports trouble."""

import asyncio
from typing import Any

import pytest

import shared.watch
from shared.accounting import Accounts
from shared.app.load import load
from shared.errors import BusError
from shared.status import StageStatus, Status
from shared.topology import Topology
from shared.transport.api import ConsumerState, ConsumerView
from shared.watch import (
    COLUMNS,
    HANDLER,
    QUEUE_WAIT,
    Buckets,
    InstanceSample,
    Sample,
    between,
    bucket_delta,
    compact,
    grown,
    instances,
    render,
    reports,
    watch,
)

BOUNDS: tuple[float | str, ...] = (0.001, 0.01, 0.1, "+Inf")


def buckets(*counts: float) -> Buckets:
    """Cumulative buckets over BOUNDS."""
    return tuple(zip(BOUNDS, counts, strict=True))


def status(*stages: str) -> Status:
    accounts = Accounts(accepted=10, completed=8, dead_lettered=2, in_flight=0,
                        dead_letters_now=2, replayed=0, purged=0)  # fmt: skip
    return Status(accounts, [StageStatus(s, 0, 0, 0, 1) for s in stages])


def instance(messages: dict[str, float] | None, handler: Buckets, **kw: object) -> InstanceSample:
    fields: dict[str, object] = {
        "stage": "rag", "instance": "rag-a", "partitions": (0, 1, 2, 5), "ready": True,
        "answered": True, "queued": 3, "ack_pending": 1, "messages": messages,
        "dead_letters": {}, "histograms": {HANDLER: handler, QUEUE_WAIT: handler},
    }  # fmt: skip
    fields.update(kw)
    return InstanceSample(**fields)  # type: ignore[arg-type]


def sample(at: float, *found: InstanceSample) -> Sample:
    return Sample(at, 1_700_000_000.0 + at, found, status("rag", "stream"))


def test_counters_and_buckets_subtract_and_a_restart_counts_from_zero():
    assert grown(10, 25) == 15
    assert grown(10, 4) == 4  # restarted under the same name
    assert bucket_delta(buckets(1, 2, 3, 3), buckets(1, 5, 9, 10)) == buckets(0, 3, 6, 7)
    assert bucket_delta(None, buckets(1, 2, 2, 2)) == buckets(1, 2, 2, 2)
    assert bucket_delta(buckets(5, 5, 5, 5), buckets(1, 1, 1, 1)) == buckets(1, 1, 1, 1)


def test_rates_and_percentiles_are_over_the_interval_only():
    before = instance({"forwarded": 100, "dead_lettered": 1}, buckets(100, 100, 100, 100))
    # 20 more in 2 s: 10 in the 1-10 ms bucket, 10 in the 10-100 ms one; 2 dead-lettered.
    after = instance({"forwarded": 118, "dead_lettered": 3, "retried": 4},
                     buckets(100, 110, 120, 120), dead_letters={"failed": 3})  # fmt: skip
    frame = between(sample(10.0, before), sample(12.0, after))
    (row,) = frame.rows
    assert frame.interval == 2.0
    assert (row.forwarded_per_s, row.dead_lettered_per_s, row.retried_per_s) == (9.0, 1.0, 2.0)
    assert row.handler_p50_ms is not None and round(row.handler_p50_ms, 6) == 10.0
    assert row.handler_p99_ms is not None and 90 < row.handler_p99_ms <= 100
    assert row.queue_wait_p99_ms == row.handler_p99_ms
    assert row.end_to_end_p50_ms is None and not row.last
    assert frame.dead_letters == {"failed": 3}


def test_nothing_happened_is_zero_rates_and_no_percentiles():
    same = instance({"forwarded": 5.0}, buckets(5, 5, 5, 5))
    (row,) = between(sample(1.0, same), sample(1.5, same)).rows
    assert (row.forwarded_per_s, row.dead_lettered_per_s) == (0.0, 0.0)
    assert row.handler_p50_ms is row.handler_p99_ms is row.queue_wait_p99_ms is None


def test_the_first_sample_and_a_new_instance_have_no_rates_yet():
    first = between(None, sample(1.0, instance({"forwarded": 5.0}, buckets(5, 5, 5, 5))))
    assert first.interval is None and first.rows[0].forwarded_per_s is None
    newcomer = instance({"forwarded": 5.0}, buckets(5, 5, 5, 5), instance="rag-b")
    frame = between(sample(1.0), sample(2.0, newcomer))
    assert frame.rows[0].forwarded_per_s is None and frame.rows[0].handler_p50_ms is None


def test_without_metrics_the_figures_are_unknown():
    bare = instance(None, buckets(0, 0, 0, 0), histograms={})
    (row,) = between(sample(1.0, bare), sample(2.0, bare)).rows
    assert row.forwarded_per_s is None and row.handler_p99_ms is None


def test_the_table_groups_by_stage_and_says_what_is_missing():
    before = instance({"forwarded": 0.0}, buckets(0, 0, 0, 0))
    after = instance({"forwarded": 20.0}, buckets(10, 20, 20, 20), dead_letters={"failed": 2.0})
    silent = instance(None, (), instance="rag-gone", answered=False, ready=False, histograms={})
    frame = between(sample(0.0, before, silent), sample(2.0, after, silent))
    text = render(frame)
    lines = text.splitlines()
    assert "over the last 2.0s" in lines[0] and "" not in lines  # no blank line inside
    header = lines[1]
    assert header.split() == list(COLUMNS)
    rag, gone, stream = lines[2:5]
    assert rag.split()[:5] == ["rag", "rag-a", "4", "[0-2,5]", "3"]
    assert rag.split()[6] == "10.0"  # forwarded per second
    assert "rag-gone (no answer)" in gone
    assert stream.split()[:5] == ["stream", "(no", "instance", "running)", "0"]
    assert lines[-2] == "dead letters by reason (running instances' totals): failed 2"
    assert lines[-1].startswith("accepted 10 = completed 8 + dead-lettered 2 + in flight 0")
    # Right-aligned columns end under their headings.
    end = header.index("fwd/s") + len("fwd/s")
    assert rag[:end].endswith("10.0")


def test_json_has_the_same_figures():
    frame = between(None, sample(1.0, instance({"forwarded": 1.0}, buckets(1, 1, 1, 1))))
    data = frame.to_dict()
    assert set(data) == {"time", "interval", "instances", "stages", "dead_letters", "accounts"}
    assert data["instances"][0]["partitions"] == (0, 1, 2, 5)
    assert data["instances"][0]["queued"] == 3
    assert data["stages"][0] == {"stage": "rag", "queued": 0, "ack_pending": 0, "instances": 1}
    assert data["accounts"]["completed"] == 8


def test_compact_partitions():
    assert compact([]) == ""
    assert compact([3, 0, 1, 2, 6, 8, 9]) == "0-3,6,8-9"


def test_replies_of_other_pipelines_are_left_out_and_silent_consumers_kept():
    topology = Topology(load())
    ok = {"stage": "rag", "instance": "rag-a", "partitions": [1, 0], "ready": True,
          "messages": {"forwarded": 2},
          HANDLER: {"buckets": [[0.001, 1], ["+Inf", 2]]}}  # fmt: skip
    other = {**ok, "instance": "rag-x"}
    replies = [
        {"endpoints": [{"subject": topology.status_subject("rag-a"), "data": ok}]},
        {"endpoints": [{"subject": "elsewhere.stages.status.rag-x", "data": other}]},
        {"endpoints": [{"subject": topology.status_subject("x"), "data": None}]},
        {"type": "garbage"},
    ]
    found = reports(topology, replies)
    assert found == [ok]
    state = ConsumerState(pending=4, ack_pending=2, redelivered=0, waiting=1)
    views = {"rag": [
        ConsumerView(topology.consumer_name("rag", "rag-a"), (), 0.0, state),
        ConsumerView(topology.consumer_name("rag", "rag-old"),
                     (topology.channel_subject("intake", 7),), 0.0, state),
    ]}  # fmt: skip
    rag, old = instances(topology, found, views)
    assert (rag.instance, rag.partitions, rag.queued, rag.ack_pending) == ("rag-a", (0, 1), 4, 2)
    assert rag.histograms[HANDLER] == ((0.001, 1.0), ("+Inf", 2.0))
    assert (old.instance, old.partitions, old.answered, old.messages) == ("rag-old", (7,), False,
                                                                          None)  # fmt: skip


def refreshes(monkeypatch: pytest.MonkeyPatch, *steps: object) -> None:
    """Make the watch's samples `steps` in turn: a Sample is returned, an exception raised,
    an Event set (then the next step follows in the same refresh)."""
    todo = list(steps)

    async def collect(bus: object, topology: object, service: str) -> Sample:
        while isinstance(todo[0], asyncio.Event):
            todo.pop(0).set()
        step = todo.pop(0)
        if isinstance(step, Exception):
            raise step
        assert isinstance(step, Sample)
        return step

    monkeypatch.setattr(shared.watch, "collect", collect)


async def watched(stop: asyncio.Event) -> tuple[list[object], list[str]]:
    """Run the refresh loop until `stop`; what it showed and what trouble it reported."""
    shown: list[object] = []
    troubles: list[str] = []
    bus: Any = None  # never used: the samples come from `refreshes`
    refreshing = watch(bus, Topology(load()), "svc", 0.01, shown.append, troubles.append, stop=stop)
    await asyncio.wait_for(refreshing, 5)
    return shown, troubles


async def test_a_refresh_that_fails_while_watching_is_reported_and_the_watch_goes_on(monkeypatch):
    stop = asyncio.Event()
    refreshes(monkeypatch, sample(0.0), BusError("no responders"), stop, sample(1.0))
    shown, troubles = await watched(stop)
    assert troubles == ["cannot read the pipeline's state (no responders); trying again"]
    assert len(shown) == 1  # the sample taken after the stop is not shown


async def test_a_refresh_cut_off_by_the_stop_is_not_reported(monkeypatch):
    # Ctrl-C while a refresh waits for its replies, then the connection closes under it (or
    # the cancellation was lost and the next refresh meets the closed connection).
    stop = asyncio.Event()
    closed = BusError("list consumers of ORCH_INTAKE: ConnectionClosedError()")
    refreshes(monkeypatch, sample(0.0), stop, closed)
    shown, troubles = await watched(stop)
    assert troubles == []
    assert len(shown) == 1
