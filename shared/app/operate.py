"""The operator's commands: `orchestrator status [--watch]` and `orchestrator dlq ...`."""

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable
from datetime import datetime
from typing import TextIO

import orjson

from shared.app.args import (
    SUBCOMMAND_OPTIONS,
    parse_time,
    positive_float,
    positive_int,
    request_id,
    session_id,
)
from shared.app.commands import url_of
from shared.app.discovery import SERVICE
from shared.deadletter import Entry
from shared.dlq import DeadLetterQueue, EntryFilter
from shared.errors import ConfigError, NoSuchStream
from shared.failure import Reason
from shared.settings import Settings
from shared.status import format_status, read_status
from shared.topology import DLQ, Topology
from shared.transport.api import MessageBus
from shared.transport.connection import Bus
from shared.watch import GIVE_UP, Frame, render, watch

WATCH_INTERVAL = 2.0
"""Seconds between refreshes of `status --watch` by default."""
WATCH_HELP = """\
status --watch: one row per stage instance, grouped by stage, from what each instance
reports over NATS (micro service `orchestrator-stage`) and from JetStream:
  partitions    how many partitions of its channel it owns [which]
  queued        messages waiting in its consumer (its partitions)
  ack-pending   messages delivered to it and not yet acknowledged
  fwd/s, dead/s, retry/s
                messages forwarded, dead-lettered and retried per second
  handler-p50, handler-p99
                time in the stage's handler, 50th and 99th percentile (ms)
  wait-p99      queue wait: from the previous stage's end to this stage (ms, 99th)
  e2e-p50, e2e-p99
                end to end, request creation to result, at the last stage (ms)
Rates and percentiles are over the last interval (none on the first refresh); "-" where
nothing happened or the instance has metrics off. Then dead letters by reason (totals the
running instances counted) and the accounting identity. On a terminal the table is
redrawn in place; otherwise each refresh is printed after a blank line. With --json, one
JSON object per refresh and line, with the same figures.
"""


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `status` and `dlq ...` on the main parser."""
    common = [SUBCOMMAND_OPTIONS]

    status = sub.add_parser(
        "status",
        parents=common,
        help="accounting identity and per-stage queues (--watch: live, per instance)",
        description="Show accepted = completed + dead-lettered + in flight for the whole "
        "pipeline, then per stage: queue depth, ack-pending, redeliveries, pulls (pull "
        "requests the instances have waiting on the server: 0 means nobody is consuming), "
        "dead letters by reason, and the instances with the partitions each owns. Read from "
        "the server; stages the server knows and the pipeline file does not are named. "
        "With --watch, a table of every stage instance refreshed until Ctrl-C.",
        epilog=WATCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument(
        "--json",
        action="store_true",
        help="machine-readable output (with --watch: one JSON object per refresh and line)",
    )
    status.add_argument(
        "--watch",
        action="store_true",
        help="refresh a table of every stage instance every --interval seconds, until Ctrl-C",
    )
    status.add_argument(
        "--interval",
        type=positive_float,
        metavar="SECONDS",
        help=f"seconds between refreshes with --watch (default {WATCH_INTERVAL:g})",
    )

    dlq = sub.add_parser(
        "dlq",
        parents=common,
        help="inspect, replay and purge the dead-letter stream",
        description="Operate on the dead-letter stream: every request that could not go on, "
        "with its original payload and why. Filters combine; each operation works on the "
        "entries that existed when it started.",
    )
    ops = dlq.add_subparsers(dest="dlq_command", required=True, metavar="OPERATION")

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--stage", help="only entries from this stage")
        p.add_argument("--reason", choices=[r.value for r in Reason], help="only this reason")
        p.add_argument("--session", type=session_id, help="only this session id")
        p.add_argument("--request-id", type=request_id, help="only this request id")
        p.add_argument(
            "--since",
            type=parse_time,
            metavar="T",
            help="failed at or after T: ISO-8601, unix time, or a duration meaning that long "
            "ago (--since 2h: in the last two hours)",
        )
        p.add_argument(
            "--until",
            type=parse_time,
            metavar="T",
            help="failed before T, as --since (--until 7d: more than seven days ago)",
        )
        p.add_argument("--limit", type=positive_int, help="at most this many entries")

    ls = ops.add_parser(
        "ls",
        parents=common,
        help="list entries (oldest first)",
        description="List matching entries, oldest first: sequence, time, stage, reason, "
        "session, request id and error. --json prints one JSON object per line.",
    )
    filters(ls)
    ls.add_argument("--json", action="store_true", help="one JSON object per line")

    show = ops.add_parser(
        "show",
        parents=common,
        help="one entry: headers and payload",
        description="Show one entry by its sequence number: every header (reason, error, "
        "stage, subject, attempts, time, trace context) and the original payload.",
    )
    show.add_argument("seq", type=positive_int, help="the entry's sequence number (from ls)")
    show.add_argument("--json", action="store_true", help="machine-readable output")

    replay = ops.add_parser(
        "replay",
        parents=common,
        help="send entries back where they failed, then delete them",
        description="Republish each matching entry's original payload to its original subject "
        "(with a fresh Nats-Msg-Id), and delete the entry once the republish is stored. Safe "
        "to interrupt: run it again (within the duplicate window) to finish the rest.",
    )
    filters(replay)
    replay.add_argument("--dry-run", action="store_true", help="only say what would be replayed")
    replay.add_argument("--rate", type=positive_float, help="at most this many replays per second")

    purge = ops.add_parser(
        "purge",
        parents=common,
        help="delete entries for good",
        description="Delete matching entries for good, without replaying them: for requests "
        "that should never run again. Asks for confirmation on a terminal; without one "
        "(scripts, CI), --yes is required.",
    )
    filters(purge)
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _filter(args: argparse.Namespace) -> EntryFilter:
    return EntryFilter(
        stage=args.stage,
        reason=args.reason,
        session=args.session,
        request_id=args.request_id,
        since=args.since,
        until=args.until,
    )


def _entry_dict(entry: Entry, payload: bool = False) -> dict[str, object]:
    out: dict[str, object] = {
        "seq": entry.seq,
        "failed_at": entry.failed_at,
        "stage": entry.stage,
        "reason": entry.reason,
        "request_id": entry.request_id,
        "session_id": entry.session_id,
        "subject": entry.subject,
        "delivered": entry.delivered,
        "error": entry.error,
        "size": len(entry.payload),
    }
    if payload:
        out["headers"] = dict(entry.headers)
        try:
            out["payload"] = orjson.loads(entry.payload)
        except orjson.JSONDecodeError:
            out["payload_bytes"] = entry.payload.decode("latin-1")
    return out


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


class _Bar:
    """A progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        width = 30
        filled = width * done // total
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(f"\r{self.label} [{bar}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


async def with_bus(args: argparse.Namespace, settings: Settings) -> int:
    """Connect, run `status` or `dlq ...`, disconnect."""
    if args.command == "status" and args.interval is not None and not args.watch:
        raise ConfigError("status --interval needs --watch")
    bus = await Bus.connect(url_of(settings), name=f"orchestrator-{args.command}", wait=5.0)
    try:
        if args.command == "status":
            return await run_status(args, Topology(settings), bus)
        return await run_dlq(args, Topology(settings), bus)
    except NoSuchStream as exc:
        raise ConfigError(
            f"{exc}: no pipeline with stream prefix {settings.stream_prefix!r} on "
            f"{url_of(settings)} yet (stages create their streams when they start; or run "
            "`orchestrator declare`)"
        ) from None
    finally:
        await bus.close()


async def run_status(args: argparse.Namespace, topology: Topology, bus: Bus) -> int:
    """`orchestrator status`, or with --watch `run_watch`."""
    if args.watch:
        return await run_watch(args, topology, bus)
    status = await read_status(bus, topology)
    if args.json:
        print(orjson.dumps(status.to_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_status(status))
    return 0


CLEAR = "\x1b[H\x1b[2J"
"""ANSI: cursor home, clear the screen."""


def _show(as_json: bool, out: TextIO) -> Callable[[Frame], None]:
    """How `status --watch` writes each frame to `out`."""
    first = True

    def show(frame: Frame) -> None:
        nonlocal first
        if as_json:
            out.write(orjson.dumps(frame.to_dict()).decode() + "\n")
        elif out.isatty():
            out.write(CLEAR + render(frame) + "\n")
        else:
            out.write(("" if first else "\n") + render(frame) + "\n")
        first = False
        out.flush()

    return show


def _trouble(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


async def run_watch(args: argparse.Namespace, topology: Topology, bus: Bus) -> int:
    """`orchestrator status --watch`: refresh until Ctrl-C, then exit 0."""
    interval = WATCH_INTERVAL if args.interval is None else args.interval
    interrupted = asyncio.Event()
    show = _show(args.json, sys.stdout)
    task = asyncio.create_task(
        watch(bus, topology, SERVICE, interval, show, _trouble, stop=interrupted)
    )
    loop = asyncio.get_running_loop()
    # Ctrl-C is how a watch ends, not an error: stop the task rather than have asyncio.run
    # turn the signal into KeyboardInterrupt (exit 130).
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    stopper = asyncio.create_task(interrupted.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        for t in (task, stopper):
            t.cancel()
        await asyncio.wait({task, stopper}, timeout=GIVE_UP)
    if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
        raise exc
    return 0


async def run_dlq(args: argparse.Namespace, topology: Topology, bus: MessageBus) -> int:
    """`orchestrator dlq OPERATION`."""
    dlq = DeadLetterQueue(bus, topology)
    op = args.dlq_command
    if op == "show":
        entry = await dlq.get(args.seq)
        if entry is None:
            print(f"no dead-letter entry #{args.seq}", file=sys.stderr)
            return 1
        if args.json:
            print(
                orjson.dumps(_entry_dict(entry, payload=True), option=orjson.OPT_INDENT_2).decode()
            )
            return 0
        for key, value in _entry_dict(entry).items():
            print(f"{key:>11}: {_when(value) if key == 'failed_at' else value}")  # type: ignore[arg-type]
        print("    headers:")
        for key, value in entry.headers.items():
            print(f"      {key}: {value}")
        print("    payload:")
        print(entry.payload.decode("utf-8", errors="backslashreplace"))
        return 0
    flt = _filter(args)
    if op == "ls":
        count = 0
        await bus.admin.stream_state(topology.stream_name(DLQ))  # NoSuchStream before a heading
        if not args.json:
            print(
                f"{'seq':>7}  {'failed at':<19}  {'stage':<9} {'reason':<12} {'request':<32}  error"
            )
        async for entry in dlq.entries(flt, args.limit):
            count += 1
            if args.json:
                print(orjson.dumps(_entry_dict(entry)).decode())
            else:
                print(
                    f"{entry.seq:>7}  {_when(entry.failed_at):<19}  {entry.stage:<9} "
                    f"{entry.reason:<12} {entry.request_id or '-':<32}  {entry.error[:80]}"
                )
        if not args.json:
            print(f"{count} entries", file=sys.stderr)
        return 0
    if op == "replay":
        report = await dlq.replay(
            flt, limit=args.limit, rate=args.rate, dry_run=args.dry_run, progress=_Bar("replay")
        )
        if args.dry_run:
            print(f"would replay {report.matched - len(report.failed)} of {report.matched} "
                  "entries")  # fmt: skip
            for seq, error in report.failed:
                print(f"  #{seq} would not be replayed: {error}", file=sys.stderr)
            return 1 if report.failed else 0
        print(f"replayed {report.replayed} of {report.matched} entries")
        for seq, error in report.failed:
            print(f"  #{seq} not replayed: {error}", file=sys.stderr)
        if report.untried:
            print(f"  {report.untried} more not tried: run the replay again later",
                  file=sys.stderr)  # fmt: skip
        return 1 if report.failed else 0
    if op == "purge":
        # What the operator confirms is what is deleted: entries stored meanwhile are kept.
        through = await dlq.last_seq()
        matched = await dlq.count(flt, args.limit, through=through)
        if matched == 0:
            print("no matching entries")
            return 0
        if not args.yes:
            if not sys.stdin.isatty():
                raise ConfigError(f"refusing to purge {matched} entries without --yes")
            question = f"Delete {matched} dead-letter entries for good? [y/N] "
            answer = await asyncio.to_thread(input, question)
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted")
                return 1
        deleted = await dlq.purge(flt, limit=args.limit, progress=_Bar("purge"), through=through)
        print(f"purged {deleted} entries")
        return 0
    raise ConfigError(f"unknown dlq operation {op!r}")
