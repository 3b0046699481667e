"""Counters, gauges and histograms for one event loop, exposed through prometheus_client.

prometheus_client's own instruments take a lock on every update, since any thread may record;
a stage records from its event loop only, so these are plain attributes updated in place: a
counter increment is one addition, a histogram observation a bisection and an addition (about
a third of the cost, measured alone). prometheus_client still writes the exposition: each
`Family` turns its children into a metric family when the registry is collected.
"""

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Literal

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

Kind = Literal["counter", "gauge", "histogram"]


class Value:
    """A counter's or a gauge's value."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add `amount`."""
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        """Subtract `amount` (gauges)."""
        self.value -= amount

    def set(self, value: float) -> None:
        """Set the value (gauges)."""
        self.value = value


class Buckets:
    """A histogram: observations counted in buckets by upper bound, and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (in the first bucket whose bound is >= it, as `le` says)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float | str, int]]:
        """`(upper_bound, observations <= it)` for every bound, the last one "+Inf"."""
        out: list[tuple[float | str, int]] = []
        total = 0
        for bound, count in zip((*self.bounds, "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out

    @property
    def count(self) -> int:
        """Observations in all."""
        return sum(self.counts)


class Family:
    """One metric name and its children, one per combination of label values."""

    def __init__(self, name: str, doc: str, kind: Kind, labels: Sequence[str],
                 bounds: Sequence[float] = ()) -> None:  # fmt: skip
        self.name, self.doc, self.kind = name, doc, kind
        self.labelnames = tuple(labels)
        self.bounds = tuple(bounds)
        self.children: dict[tuple[str, ...], Value | Buckets] = {}

    def labels(self, *values: str) -> "Value | Buckets":
        """The child for these label values, made on first use."""
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = Buckets(self.bounds) if self.kind == "histogram" else Value()
            self.children[values] = child
        return child

    def value(self, *values: str) -> Value:
        """The child of a counter or gauge."""
        child = self.labels(*values)
        assert isinstance(child, Value)
        return child

    def histogram(self, *values: str) -> Buckets:
        """The child of a histogram."""
        child = self.labels(*values)
        assert isinstance(child, Buckets)
        return child

    def remove(self, *values: str) -> None:
        """Forget a child (a series that no longer exists)."""
        self.children.pop(values, None)

    def collect(self) -> Metric:
        """The family as prometheus_client exposes it."""
        labels = list(self.labelnames)
        if self.kind == "histogram":
            family: Metric = HistogramMetricFamily(self.name, self.doc, labels=labels)
            for values, child in self.children.items():
                assert isinstance(child, Buckets)
                buckets = [(b if isinstance(b, str) else floatToGoString(b), float(c))
                           for b, c in child.cumulative()]  # fmt: skip
                family.add_metric(list(values), buckets, child.sum)  # type: ignore[attr-defined]
            return family
        made = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        family = made(self.name, self.doc, labels=labels)
        for values, child in self.children.items():
            assert isinstance(child, Value)
            family.add_metric(list(values), child.value)  # type: ignore[attr-defined]
        return family


class Collector:
    """Hands a registry the families it was built with (a prometheus_client collector)."""

    def __init__(self, families: Sequence[Family]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        """Every family, children and all."""
        for family in self.families:
            yield family.collect()
