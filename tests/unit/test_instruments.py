"""The event-loop instruments count as Prometheus would, and expose in its format."""

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shared.instruments import Collector, Family
from shared.metrics import quantile


def exposed(*families: Family) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(Collector(families))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_histogram_counts_a_value_on_a_bound_in_that_bucket():
    h = Family("t_seconds", "test", "histogram", ["stage"], bounds=(0.1, 1.0))
    child = h.histogram("a")
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        child.observe(value)
    assert child.cumulative() == [(0.1, 2), (1.0, 4), ("+Inf", 5)]
    assert child.count == 5 and child.sum == 8.65
    found = exposed(h)
    assert found[("t_seconds_bucket", (("le", "0.1"), ("stage", "a")))] == 2
    assert found[("t_seconds_bucket", (("le", "+Inf"), ("stage", "a")))] == 5
    assert found[("t_seconds_count", (("stage", "a"),))] == 5
    assert found[("t_seconds_sum", (("stage", "a"),))] == 8.65


def test_counters_and_gauges_expose_their_values_and_forget_removed_series():
    c = Family("t_things", "test", "counter", ["kind"])
    g = Family("t_level", "test", "gauge", ["part"])
    c.value("x").inc()
    c.value("x").inc(2)
    g.value("0").set(5)
    g.value("1").set(3)
    g.remove("1")
    assert exposed(c, g) == {("t_things_total", (("kind", "x"),)): 3.0,
                             ("t_level", (("part", "0"),)): 5.0}  # fmt: skip


def test_wrong_label_count_is_refused():
    c = Family("t_things", "test", "counter", ["a", "b"])
    try:
        c.value("only-one")
    except ValueError as exc:
        assert "takes labels" in str(exc)
    else:
        raise AssertionError("accepted one label value of two")


def test_quantile_interpolates_within_the_bucket_as_prometheus_does():
    buckets = [[0.1, 2], [1.0, 4], ["+Inf", 5]]
    assert quantile(buckets, 0.4) == 0.1  # rank 2: the top of the first bucket
    assert quantile(buckets, 0.6) == 0.1 + 0.9 * (3 - 2) / (4 - 2)
    assert quantile(buckets, 0.99) == 1.0  # in +Inf: the largest finite bound
    assert quantile([[0.1, 0], ["+Inf", 0]], 0.5) is None
