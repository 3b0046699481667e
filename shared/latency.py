"""Latency figures from results: per-stage queue and handling times, and end to end."""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shared.envelope import Result


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


@dataclass(frozen=True)
class StageLatency:
    """Queue wait (time in the stage's input stream) and handling time of one stage, in ms."""

    stage: str
    wait_p50: float
    wait_p99: float
    handle_p50: float
    handle_p99: float


def stage_latencies(results: Iterable[Result]) -> tuple[list[StageLatency], list[float]]:
    """Per-stage latencies in pipeline order, and the end-to-end latencies (ms)."""
    waits: dict[str, list[float]] = {}
    handles: dict[str, list[float]] = {}
    end_to_end = []
    for result in results:
        previous = result.created_at
        for hop in result.hops:
            waits.setdefault(hop.stage, []).append((hop.received - previous) * 1000)
            handles.setdefault(hop.stage, []).append((hop.done - hop.received) * 1000)
            previous = hop.done
        end_to_end.append((result.completed_at - result.created_at) * 1000)
    rows = [
        StageLatency(
            stage,
            percentile(waits[stage], 50),
            percentile(waits[stage], 99),
            percentile(handles[stage], 50),
            percentile(handles[stage], 99),
        )
        for stage in waits
    ]
    return rows, end_to_end


def format_table(rows: list[StageLatency], end_to_end: list[float]) -> str:
    """A plain-text table of `rows` with an end-to-end line."""
    lines = [
        f"{'stage':<10} {'queue p50':>10} {'queue p99':>10} {'handle p50':>11} {'handle p99':>11}",
    ]
    for r in rows:
        lines.append(
            f"{r.stage:<10} {r.wait_p50:>8.2f}ms {r.wait_p99:>8.2f}ms "
            f"{r.handle_p50:>9.2f}ms {r.handle_p99:>9.2f}ms"
        )
    lines.append(
        f"{'end-to-end':<10} p50 {percentile(end_to_end, 50):.2f}ms, "
        f"p99 {percentile(end_to_end, 99):.2f}ms over {len(end_to_end)} requests"
    )
    return "\n".join(lines)
