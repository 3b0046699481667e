"""The demo's latency table, read from the stages' own histograms (shared.metrics): per stage
the queue wait and handling time, and end to end at the last stage, p50 and p99."""

from shared.metrics import Metrics, quantile
from shared.runtime.group import StageGroup


def _ms(histogram: dict[str, object] | None, q: float) -> str:
    value = quantile(histogram["buckets"], q) if histogram else None  # type: ignore[arg-type]
    return f"{value * 1000:>8.2f}ms" if value is not None else f"{'-':>10}"


def latency_table(metrics: Metrics, group: StageGroup) -> str:
    """A plain-text table of every stage instance in `group`, with an end-to-end line.

    Percentiles come from histogram buckets (interpolated, as Prometheus does), so they are
    estimates within a bucket's width: the same figures `/metrics` and `status --watch` give.
    """
    lines = [f"{'stage':<10} {'queue p50':>10} {'queue p99':>10} {'handle p50':>11} "
             f"{'handle p99':>11}"]  # fmt: skip
    end_to_end = None
    for rt in group.runtimes:
        snap = metrics.snapshot(rt.name, rt.instance)
        wait, handle = snap.get("queue_wait_seconds"), snap.get("handler_duration_seconds")
        lines.append(f"{rt.name:<10} {_ms(wait, 0.5)} {_ms(wait, 0.99)} {_ms(handle, 0.5)} "
                     f" {_ms(handle, 0.99)}")  # fmt: skip
        end_to_end = snap.get("request_duration_seconds") or end_to_end
    if end_to_end:
        p50, p99 = _ms(end_to_end, 0.5).strip(), _ms(end_to_end, 0.99).strip()
        count = end_to_end["count"]
        lines.append(f"{'end-to-end':<10} p50 {p50}, p99 {p99} over {count:.0f} requests")
    return "\n".join(lines)
