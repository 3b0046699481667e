"""`orchestrator status --watch`: a live table of every stage instance, from the micro stats
the instances answer and from JetStream, on a real server with stage processes."""

import asyncio
import contextlib
import json
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

from shared.client import Client
from shared.settings import Settings
from shared.status import read_status
from shared.topology import Topology
from shared.transport.connection import Bus
from shared.watch import COLUMNS
from tests.support import (
    ROOT,
    STAGE_NAMES,
    StageProcess,
    orchestrator_command,
    settings_for,
    stage_env,
    wait_quiet,
    wait_until_consuming,
)

POISONED = 3


@contextlib.asynccontextmanager
async def pipeline(url: str, tmp_path: Path) -> AsyncIterator[tuple[dict[str, str], Settings]]:
    """The five stages as processes, inference twice (one named `second`); its worker fails
    prompts containing `poison`, which are dead-lettered after two attempts."""
    env = stage_env(url, ORCH_STAGES__INFERENCE__OPTIONS__WORKER="tests.workers:poison",
                    ORCH_STAGES__INFERENCE__MAX_DELIVER="2",
                    ORCH_STAGES__INFERENCE__BACKOFF="[0.05]")  # fmt: skip
    procs = [StageProcess(s, env, tmp_path) for s in STAGE_NAMES]
    twin = {**env, "ORCH_INSTANCE": "second"}
    procs.append(StageProcess("inference", twin, tmp_path, name="inference-second"))
    try:
        settings = settings_for(env)
        await wait_until_consuming(url, settings)
        await instance_names(url, settings)  # the two inference instances share the work
        yield env, settings
    finally:
        for p in procs:
            p.signal(signal.SIGTERM)
        assert [p.stop() for p in procs] == [0] * len(procs)


async def run_through(url: str, settings: Settings, healthy: int) -> None:
    """`healthy` requests to their results and POISONED to the dead-letter stream."""
    async with await Client.connect(settings, url) as client:
        ids = [await client.publish(f"question {i}", f"w-{i}") for i in range(healthy)]
        for i in range(POISONED):
            await client.publish(f"poison {i}", f"p-{i}")
        for rid in ids:
            await client.result(rid, timeout=60)
    status = await wait_quiet(url, settings)
    assert status.accounts.dead_lettered == POISONED


async def instance_names(url: str, settings: Settings) -> dict[str, set[str]]:
    """stage -> its instances, as they announce themselves, once each stage's instances own
    all 8 partitions between them and inference has two, owning 4 each."""
    async with await Bus.connect(url, name="test-watch") as bus, asyncio.timeout(60):
        while True:
            owners = {
                s.stage: s.instances for s in (await read_status(bus, Topology(settings))).stages
            }
            shares = {stage: sorted(map(len, held.values())) for stage, held in owners.items()}
            if shares == {**{stage: [8] for stage in STAGE_NAMES}, "inference": [4, 4]}:
                return {stage: set(held) for stage, held in owners.items()}
            await asyncio.sleep(0.1)


async def start_watch(env: dict[str, str], *flags: str) -> asyncio.subprocess.Process:
    """`orchestrator status --watch --interval 0.5 FLAGS`, its output a pipe (not a TTY)."""
    return await asyncio.create_subprocess_exec(
        *orchestrator_command(), "status", "--watch", "--interval", "0.5", *flags, cwd=ROOT,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def interrupt(proc: asyncio.subprocess.Process) -> str:
    """SIGINT, as Ctrl-C sends; the exit code must be 0 and stderr empty."""
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return err.decode()


async def read_tables(proc: asyncio.subprocess.Process, count: int) -> list[list[str]]:
    """The first `count` refreshes: each a block of lines ending with the counts line."""
    assert proc.stdout is not None
    tables: list[list[str]] = [[]]
    while len(tables) <= count:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line, "the watch ended"
        if line.strip():
            tables[-1].append(line.rstrip("\n"))
        if line.startswith("accepted "):
            tables.append([])
        elif not line.strip():
            assert not tables[-1], "a blank line inside a refresh"
    return tables[:count]


def rows(table: list[str]) -> list[dict[str, str]]:
    """The table's rows as column -> cell, cut where the header's columns are."""
    header = next(i for i, line in enumerate(table) if line.startswith("stage "))
    head = table[header]
    instance, partitions = head.index("instance"), head.index("partitions")
    ends, at = [], 0
    for name in COLUMNS[3:]:  # right-aligned: each cell ends where its heading does
        at = head.index(name, at) + len(name)
        ends.append(at)
    out = []
    for line in table[header + 1 :]:
        if line.startswith("dead letters"):
            break
        owned, queued = line[partitions : ends[0]].rsplit(None, 1)
        cells = {"stage": line[:instance].strip(), "instance": line[instance:partitions].strip(),
                 "partitions": owned.strip(), "queued": queued}  # fmt: skip
        for name, start, end in zip(COLUMNS[4:], ends[:-1], ends[1:], strict=True):
            cells[name] = line[start:end].strip()
        out.append(cells)
    return out


def number(cell: str) -> float:
    """A figure the table shows, which must be there."""
    assert cell not in ("", "-"), cell
    return float(cell)


async def test_watch_table_names_every_instance_with_rates_and_percentiles(nats_server, tmp_path):
    url = nats_server.url
    async with pipeline(url, tmp_path) as (env, settings):
        await run_through(url, settings, healthy=10)
        expected = await instance_names(url, settings)

        async def steady(client: Client) -> None:
            i = 0
            while True:  # 40 requests a second, on sessions spread over every partition
                await client.publish(f"steady {i}", f"s-{i}")
                i += 1
                await asyncio.sleep(0.025)

        async with await Client.connect(settings, url) as client:
            publisher = asyncio.create_task(steady(client))
            await asyncio.sleep(1.0)  # flowing through every stage before the watch starts
            proc = await start_watch(env)
            try:
                first, second = await read_tables(proc, 2)
            finally:
                err = await interrupt(proc)
                publisher.cancel()
        await wait_quiet(url, settings)
    assert err == ""

    for table in (first, second):
        assert table[0].startswith("20")  # the time of the refresh
        found: dict[str, set[str]] = {}
        for row in rows(table):
            found.setdefault(row["stage"], set()).add(row["instance"])
        assert found == expected, table
        assert f"dead letters by reason (running instances' totals): failed {POISONED}" in table
        assert table[-1].startswith("accepted ") and "completed" in table[-1]
    assert "from the next refresh" in first[0]
    assert all(row["fwd/s"] == "-" for row in rows(first))

    assert "over the last 0.5s" in second[0] or "over the last 0.6s" in second[0], second[0]
    by_stage: dict[str, list[dict[str, str]]] = {}
    for row in rows(second):
        by_stage.setdefault(row["stage"], []).append(row)
        partitions = row["partitions"]
        assert partitions in ("8 [0-7]",) or row["stage"] == "inference", row
        assert number(row["queued"]) >= 0 and number(row["ack-pending"]) >= 0
        assert number(row["dead/s"]) == 0 and number(row["retry/s"]) == 0
    assert sorted(r["partitions"][0] for r in by_stage["inference"]) == ["4", "4"]
    for stage, stage_rows in by_stage.items():
        assert sum(number(r["fwd/s"]) for r in stage_rows) > 5, (stage, second)
        busy = [r for r in stage_rows if number(r["fwd/s"]) > 0]
        for row in busy:
            assert 0 < number(row["handler-p50"]) <= number(row["handler-p99"]), row
            assert number(row["wait-p99"]) > 0, row
        for row in stage_rows:
            if stage == "stream":
                assert 0 < number(row["e2e-p50"]) <= number(row["e2e-p99"]), row
            else:
                assert row["e2e-p50"] == row["e2e-p99"] == "", row


async def test_watch_json_lines_carry_the_same_figures(nats_server, tmp_path):
    url = nats_server.url
    async with pipeline(url, tmp_path) as (env, settings):
        await run_through(url, settings, healthy=12)
        expected = await instance_names(url, settings)
        proc = await start_watch(env, "--json")
        try:
            assert proc.stdout is not None
            lines = [await asyncio.wait_for(proc.stdout.readline(), 30) for _ in range(2)]
        finally:
            err = await interrupt(proc)
    assert err == ""

    first, second = (json.loads(line) for line in lines)
    for frame in (first, second):
        assert set(frame) == {"time", "interval", "instances", "stages", "dead_letters",
                              "accounts"}  # fmt: skip
        assert frame["dead_letters"] == {"failed": POISONED}
        accounts = frame["accounts"]
        assert (accounts["accepted"], accounts["completed"], accounts["dead_lettered"],
                accounts["in_flight"]) == (12 + POISONED, 12, POISONED, 0)  # fmt: skip
        assert [s["stage"] for s in frame["stages"]] == STAGE_NAMES
        assert {s["stage"]: s["instances"] for s in frame["stages"]} == {
            stage: len(names) for stage, names in expected.items()
        }
        found: dict[str, set[str]] = {}
        for row in frame["instances"]:
            found.setdefault(row["stage"], set()).add(row["instance"])
            assert row["answered"] and row["ready"]
            assert (row["queued"], row["ack_pending"]) == (0, 0)
            assert row["last"] == (row["stage"] == "stream")
        assert found == expected
        owned = sorted(p for r in frame["instances"] if r["stage"] == "inference"
                       for p in r["partitions"])  # fmt: skip
        assert owned == list(range(8))
    assert first["interval"] is None
    assert all(r["forwarded_per_s"] is None for r in first["instances"])
    assert 0.4 < second["interval"] < 2
    for row in second["instances"]:  # nothing flowed in between
        assert row["forwarded_per_s"] == row["dead_lettered_per_s"] == 0.0
        assert row["handler_p50_ms"] is None and row["end_to_end_p99_ms"] is None


def test_watch_without_a_server_or_with_a_stray_interval_is_one_line_error():
    env = stage_env("nats://127.0.0.1:9")
    for flags, expected in (
        (["--watch"], "cannot reach NATS at nats://127.0.0.1:9"),
        (["--interval", "1"], "status --interval needs --watch"),
        (["--watch", "--json"], "cannot reach NATS at nats://127.0.0.1:9"),
    ):
        done = subprocess.run([*orchestrator_command(), "status", *flags], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert (done.returncode, done.stdout) == (2, ""), done.stderr
        [line] = done.stderr.splitlines()
        assert line.startswith("error: ") and expected in line, line
