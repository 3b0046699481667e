"""`orchestrator status`: the accounting identity and each stage's queue, read from the server."""

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from shared.accounting import Accounts, Snapshot, account
from shared.graph import INTAKE
from shared.topology import COUNTERS, DLQ, OUTCOMES, RESULTS, Topology
from shared.transport.api import ConsumerView, MessageBus


@dataclass(frozen=True)
class StageStatus:
    """One stage's input, its consumers and its instances, as the server sees them."""

    stage: str
    queued: int
    ack_pending: int
    redelivered: int
    waiting_pulls: int
    dead_lettered: dict[str, int] = field(default_factory=dict)
    instances: dict[str, list[int]] = field(default_factory=dict)
    """Announced instances and the partitions each says it owns."""


@dataclass(frozen=True)
class Status:
    """The whole pipeline at one moment."""

    accounts: Accounts
    stages: list[StageStatus]
    unknown_stages: list[str] = field(default_factory=list)
    """Stages the server shows signs of (announced instances, dead-letter entries) that the
    pipeline file read here does not have: another pipeline file is running."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "accounts": {
                **asdict(self.accounts),
                "balanced": self.accounts.balanced,
                "surplus": self.accounts.surplus,
            },
            "stages": [asdict(s) for s in self.stages],
            "unknown_stages": self.unknown_stages,
        }


async def consumer_views(bus: MessageBus, topology: Topology) -> dict[str, list[ConsumerView]]:
    """Each stage's consumers (one per instance), as the server lists them."""
    return {
        stage.name: await bus.admin.consumers(topology.stream_name(stage.channel))
        for stage in topology.graph
    }


async def read_status(
    bus: MessageBus, topology: Topology, views: dict[str, list[ConsumerView]] | None = None
) -> Status:
    """Read every counter the status needs from the server, for every stage of the graph
    (`views`: the stages' consumers, when the caller has just read them)."""
    admin = bus.admin
    if views is None:
        views = await consumer_views(bus, topology)
    channels = topology.channel_names()
    channel_state = {c: await admin.stream_state(topology.stream_name(c)) for c in channels}
    dlq_name = topology.stream_name(DLQ)
    dlq = await admin.stream_state(dlq_name)
    per_subject = (
        await admin.subject_counts(dlq_name, topology.dlq_subject()) if dlq.messages else {}
    )
    counters = topology.stream_name(COUNTERS)
    replayed = {
        c: await admin.counter(counters, topology.counter_subject(f"replayed.{c}"))
        for c in channels
    }
    snapshot = Snapshot(
        intake_stored=channel_state[INTAKE].last_seq,
        results_stored=(await admin.stream_state(topology.stream_name(RESULTS))).last_seq,
        dead_letters_stored=dlq.last_seq,
        dead_letters_now=dlq.messages,
        channel_messages={c: s.messages for c, s in channel_state.items()},
        replayed=replayed,
        purged=await admin.counter(counters, topology.counter_subject("purged")),
        outcomes=await admin.counter(counters, topology.counter_subject(OUTCOMES)),
    )
    members = await members_by_stage(bus, topology)
    rows = []
    for stage in topology.graph:
        consumers = views.get(stage.name, [])
        prefix = topology.dlq_subject(stage.name, "")
        reasons = {s[len(prefix) :]: n for s, n in per_subject.items() if s.startswith(prefix)}
        rows.append(
            StageStatus(
                stage=stage.name,
                queued=channel_state[stage.channel].messages,
                ack_pending=sum(v.state.ack_pending for v in consumers),
                redelivered=sum(v.state.redelivered for v in consumers),
                waiting_pulls=sum(v.state.waiting for v in consumers),
                dead_lettered=reasons,
                instances=members.get(stage.name, {}),
            )
        )
    # Dead-letter subjects are <prefix>.dlq.<stage>.<reason>.
    seen = set(members) | {subject.rsplit(".", 2)[-2] for subject in per_subject}
    return Status(account(snapshot), rows, sorted(seen - set(topology.graph.names)))


async def members_by_stage(bus: MessageBus, topology: Topology) -> dict[str, dict[str, list[int]]]:
    """stage -> instance -> owned partitions, from the instances' announcements."""
    # A reader's settings are not the deployment's to impose: bound to as it is.
    kv = await bus.key_value(topology.members(), adjust=False)
    out: dict[str, dict[str, list[int]]] = {}
    for value in (await kv.items("")).values():
        data = orjson.loads(value)
        out.setdefault(data["stage"], {})[data["instance"]] = data["owned"]
    return out


async def coverage(bus: MessageBus, topology: Topology) -> dict[str, bool]:
    """Per stage: is every partition held by a consumer with a pull waiting?"""
    out = {}
    for stage, views in (await consumer_views(bus, topology)).items():
        held: set[int] = set()
        for view in views:
            if view.state.waiting:
                held |= {topology.partition_of_subject(s) for s in view.subjects} - {None}
        out[stage] = held == set(range(topology.partitions))
    return out


async def until_consuming(bus: MessageBus, topology: Topology, timeout: float) -> bool:
    """Wait until every stage `coverage` reports covered; False if `timeout` passed first."""
    deadline = time.monotonic() + timeout
    while not all((await coverage(bus, topology)).values()):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def verdict(status: Status) -> tuple[str, list[str]]:
    """Whether the identity holds and, when it does not, what can make it not hold now."""
    a = status.accounts
    if a.balanced:
        return "balanced", []
    if a.surplus < 0:
        return f"NOT balanced: {-a.surplus} accepted requests missing", [
            "accepted but neither completed, dead-lettered nor in flight: deleted from a "
            "channel stream outside the pipeline, or a replay is under way"
        ]
    lines = []
    if a.in_flight > 0 or any(s.ack_pending for s in status.stages):
        lines.append("messages are moving: one being handed on counts twice for a moment")
    lines.append(
        "messages published straight to stage subjects, not through the intake, "
        "are not counted as accepted"
    )
    lines.append(
        "a request that ended in two places: redelivered after a fault that outlasted "
        "duplicate_window, or replayed from the dead-letter stream after it had completed "
        "(`orchestrator result` on the ids `dlq ls` lists finds them)"
    )
    return f"NOT balanced: {a.surplus} more than accepted", lines


def counts_line(status: Status) -> str:
    """accepted = completed + dead-lettered + in flight, and whether that holds, on one line."""
    a = status.accounts
    return (
        f"accepted {a.accepted} = completed {a.completed} + dead-lettered {a.dead_lettered}"
        f" + in flight {a.in_flight}   [{verdict(status)[0]}]"
    )


def format_status(status: Status) -> str:
    """A plain-text rendering for terminals."""
    a = status.accounts
    _, why = verdict(status)
    lines = [
        counts_line(status),
        *(f"  ({line})" for line in why),
        f"dead-letter stream: {a.dead_letters_now} entries now, {a.replayed} replayed, "
        f"{a.purged} purged",
        "",
        f"{'stage':<10} {'queued':>7} {'ack-pending':>11} {'redelivered':>11} {'pulls':>5}  "
        "dead-lettered (now)",
    ]
    for s in status.stages:
        dead = ", ".join(f"{r}={n}" for r, n in sorted(s.dead_lettered.items())) or "-"
        lines.append(
            f"{s.stage:<10} {s.queued:>7} {s.ack_pending:>11} {s.redelivered:>11} "
            f"{s.waiting_pulls:>5}  {dead}"
        )
    if status.unknown_stages:
        lines.append(f"(also on the server, not in this pipeline file: "
                     f"{', '.join(status.unknown_stages)}; pass the pipeline file the stages "
                     "run with, --config)")  # fmt: skip
    lines += ["", "instances and the partitions they own:"]
    for s in status.stages:
        for instance, owned in sorted(s.instances.items()):
            lines.append(f"  {s.stage:<10} {instance:<40} {owned}")
        if not s.instances:
            lines.append(f"  {s.stage:<10} (no instance running)")
    return "\n".join(lines)
