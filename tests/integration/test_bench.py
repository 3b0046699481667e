"""The benchmark's smoke run completes and reports sane numbers (never a time)."""

import json
import re
import subprocess
import sys

from tests.support import ROOT


def test_quick_bench_reports_every_measure(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--no-faststream", "--json", str(out),
         "--workdir", str(tmp_path / "stores")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    names = [m["config"] for m in report["results"]]
    assert names[:2] in (
        ["raw nats-py (5 processes)", "project (5 processes)"],
        ["project (5 processes)", "raw nats-py (5 processes)"],
    )
    assert "project (orchestrator up)" in names
    assert "project (2 per stage)" in names
    for m in report["results"]:
        assert m["throughput"] > 0
        assert m["cpu_ms_per_request"] > 0
        assert m["cores_busy"] > m["server_cores_busy"] > 0
        assert m["peak_rss_mb"] and all(mb > 0 for mb in m["peak_rss_mb"].values())
        for lat in m["latency"].values():
            assert 0 <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    project = next(m for m in report["results"] if m["config"] == "project (5 processes)")
    assert set(project["stage_ms"]) == {"rag", "assemble", "inference", "post", "stream"}
    assert report["ratios"]["throughput_vs_raw"] > 0
    by_round = [v for k, v in report["ratios"].items() if k.endswith("_by_round")]
    assert by_round and all(len(v) == 1 and v[0] > 0 for v in by_round)  # one round in --quick
    assert "throughput_vs_raw" in done.stdout
    # The closed-loop saturation run: every accepted request ends, completed or shed.
    saturated = {s["config"]: s for s in report["saturation"]}
    assert set(saturated) == {"raw nats-py (5 processes)", "raw nats-py publish_async",
                              "project (5 processes)"}  # fmt: skip
    for s in saturated.values():
        assert s["completed"] + s["dead_lettered"] == s["requests"] and s["goodput"] > 0
    for key in ("goodput_vs_raw_batch", "goodput_vs_raw_async", "dead_lettered_at_saturation",
                "goodput_vs_raw_batch_median", "p99_vs_raw_at_half_median"):  # fmt: skip
        assert report["ratios"][key] >= 0
    for key in ("goodput_vs_raw_batch_by_round", "p99_vs_raw_at_half_by_round"):
        assert len(report["ratios"][key]) == 1 and report["ratios"][key][0] > 0
    # The tail at half of raw's max: one round of each in --quick, a latency each.
    assert sorted(t["config"] for t in report["tail"]) == sorted(names[:2])
    for t in report["tail"]:
        assert 0 < t["p50"] <= t["p99"] <= t["max"]


def test_light_load_bench_reports_latency_and_cpu_per_request(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench.light", "--rates", "50", "--seconds", "1", "--rounds", "1",
         "--checked", "--workdir", str(tmp_path / "stores")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split("  ")[0].strip() for line in lines] == [
        "raw nats-py", "raw nats-py, checked", "project"]  # fmt: skip
    for line in lines:
        assert 0 < _after(line, "p50") <= _after(line, "p99")
        for label in ("stage CPU", "server CPU", "cores busy"):
            assert _after(line, label) > 0, line


def _after(line: str, label: str) -> float:
    found = re.search(rf"{label} +([0-9.]+)", line)
    assert found, f"no {label!r} in {line!r}"
    return float(found.group(1))


def test_hop_bench_measures_every_hop_of_both_pipelines(tmp_path):
    out = tmp_path / "hop.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.hop", "--requests", "200", "--rounds", "1",
         "--json", str(out), "--workdir", str(tmp_path / "stores")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    hops = {r["pipeline"]: r["ms_per_message"] for r in report["runs"]}
    assert set(hops["raw"]) == {f"h{i}" for i in range(1, 6)}
    assert set(hops["project"]) == {"rag", "assemble", "inference", "post", "stream"}
    assert all(ms > 0 for costs in hops.values() for ms in costs.values())
    assert report["ratios"]["project_vs_raw"] > 0
