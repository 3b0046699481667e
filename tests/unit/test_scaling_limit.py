"""bench.run says what limits the scaling curve from the cores each run kept busy."""

from bench.run import Measurement, scaling_limit


def run(throughput: float, busy: float, server: float) -> Measurement:
    return Measurement(config="c", requests=1000, seconds=1.0, throughput=throughput,
                       cpu_ms_per_request=0.3, server_cpu_ms_per_request=0.1, peak_rss_mb={},
                       cores_busy=busy, server_cores_busy=server)  # fmt: skip


def test_a_curve_that_grows_reached_no_limit():
    verdict = scaling_limit([run(1000, 1.0, 0.3), run(1800, 1.6, 0.5), run(2500, 1.9, 0.7)], 8)
    assert verdict.endswith("throughput grows with the instances (no limit reached)")
    assert "1000, 1800, 2500 req/s with 1.00, 1.60, 1.90 of 8 cores busy" in verdict


def test_every_core_busy_makes_the_machine_the_limit():
    verdict = scaling_limit([run(3400, 1.95, 0.6), run(3300, 1.97, 0.6), run(3100, 1.98, 0.7)], 2)
    assert "the machine's CPU is the limit" in verdict and "nats-server up to 0.70" in verdict


def test_a_busy_server_on_a_machine_with_room_is_the_limit():
    verdict = scaling_limit([run(3000, 3.0, 1.0), run(3100, 3.5, 1.1), run(3000, 3.9, 1.1)], 8)
    assert "nats-server is the limit" in verdict


def test_neither_is_said_when_neither_is_busy():
    verdict = scaling_limit([run(500, 0.5, 0.1), run(510, 0.6, 0.1), run(505, 0.7, 0.1)], 8)
    assert "neither the CPU nor nats-server is the limit" in verdict


def test_a_curve_that_rises_then_stays_flat_met_its_limit_where_it_stopped():
    # 1 -> 2 instances gained 14 %, 2 -> 4 nothing, every core busy: the CPU, not "no limit".
    verdict = scaling_limit([run(2459, 1.97, 0.4), run(2796, 1.98, 0.4), run(2807, 1.97, 0.4)], 2)
    assert "no limit" not in verdict
    assert verdict.endswith(
        "throughput grows over the first 2 runs, then the machine's CPU is the limit (every "
        "core busy; nats-server up to 0.40 of them)"
    )
