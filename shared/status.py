"""`orchestrator status`: the accounting identity and each stage's queue, read from the server."""

from dataclasses import asdict, dataclass, field
from typing import Any

from shared.accounting import Accounts, Snapshot, account
from shared.bus import Bus
from shared.settings import Settings
from shared.stage import RESULTS, StageSpec
from shared.topology import COUNTERS, DLQ, Topology


@dataclass(frozen=True)
class StageStatus:
    """One stage's input and consumer as the server sees them."""

    stage: str
    queued: int
    ack_pending: int
    redelivered: int
    waiting_pulls: int
    dead_lettered: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Status:
    """The whole pipeline at one moment."""

    accounts: Accounts
    stages: list[StageStatus]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "accounts": {**asdict(self.accounts), "balanced": self.accounts.balanced},
            "stages": [asdict(s) for s in self.stages],
        }


async def read_status(bus: Bus, settings: Settings, stages: list[StageSpec]) -> Status:
    """Read every counter the status needs from the server."""
    topology = Topology(settings)
    channels = topology.channel_names()
    channel_state = {c: await bus.stream_state(topology.stream_name(c)) for c in channels}
    dlq_name = topology.stream_name(DLQ)
    dlq = await bus.stream_state(dlq_name)
    per_subject = await bus.subject_counts(dlq_name, topology.dlq_subject()) if dlq.messages else {}
    counters = topology.stream_name(COUNTERS)
    replayed = {
        c: await bus.counter(counters, topology.counter_subject(f"replayed.{c}")) for c in channels
    }
    snapshot = Snapshot(
        intake_stored=channel_state["intake"].last_seq,
        results_stored=(await bus.stream_state(topology.stream_name(RESULTS))).last_seq,
        dead_letters_stored=dlq.last_seq,
        dead_letters_now=dlq.messages,
        channel_messages={c: s.messages for c, s in channel_state.items()},
        replayed=replayed,
        purged=await bus.counter(counters, topology.counter_subject("purged")),
    )
    rows = []
    for spec in stages:
        consumer = topology.consumer(spec)
        state = await bus.consumer_state(consumer.stream, consumer.durable)
        prefix = topology.dlq_subject(spec.name, "")
        reasons = {s[len(prefix) :]: n for s, n in per_subject.items() if s.startswith(prefix)}
        rows.append(
            StageStatus(
                stage=spec.name,
                queued=channel_state[spec.input].messages,
                ack_pending=state.ack_pending,
                redelivered=state.redelivered,
                waiting_pulls=state.waiting,
                dead_lettered=reasons,
            )
        )
    return Status(account(snapshot), rows)


def format_status(status: Status) -> str:
    """A plain-text rendering for terminals."""
    a = status.accounts
    verdict = "balanced" if a.balanced else "NOT balanced (still moving?)"
    lines = [
        f"accepted {a.accepted} = completed {a.completed} + dead-lettered {a.dead_lettered}"
        f" + in flight {a.in_flight}   [{verdict}]",
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
    return "\n".join(lines)
