"""Benchmark the pipeline against a raw nats-py five-hop baseline, in one run.

    python -m bench.run                       # full run (15-20 minutes)
    python -m bench.run --quick               # ~30 s smoke run
    python -m bench.run --compare b1f5640     # also the project as of that commit, alternating

Each configuration gets a fresh nats-server (file storage, 127.0.0.1). Per configuration it
measures: max throughput (N requests published as fast as the intake takes them, until all N
results arrived), end-to-end latency under open-loop load at 10, 25 and 50 % of the raw
pipeline's max (measured first), per-stage time (project pipelines), peak RSS of each stage
process and CPU per request. Then a closed-loop saturation run against channels of the
default size (512): a client keeps 256 publishes in flight and sends again what the full
intake refused; goodput counts completed requests, and dead-lettered ones are counted apart.
Then the tail alone: the project and raw nats-py at half of raw's max, each round on a fresh
server. Baselines: plain nats-py hops gathering `js.publish` per batch, and with
`js.publish_async` per batch (and FastStream when installed).

The project and the baselines alternate, and ratios are computed from numbers of the same
run: of the best rounds, and for the saturation run and the tail (five rounds each) of the
medians and round by round (`*_median`, `*_by_round`). A full run also measures the project
with metrics off (`[metrics] enabled = false`) beside it, so `throughput_metrics_on_vs_off`
and `goodput_metrics_on_vs_off` say what recording them costs, and raw nats-py with each hop
checking every message as a stage does (decode and validate the envelope, append a hop
record, encode it; `bench/raw_hop.py ... checked`), so `throughput_vs_checked_raw` and
`p99_vs_checked_raw_at_<rate>` say what the project's runtime costs apart from the checks.
"""

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median

import nats
import nats.js.errors
import orjson

from bench.stats import percentile
from bench.topology import HOPS, declare_raw
from shared.app.natsserver import EmbeddedNats
from shared.envelope import encode, new_request
from shared.partition import partition_of

ROOT = Path(__file__).parents[1]
STAGES = ("rag", "assemble", "inference", "post", "stream")
SESSIONS = [f"bench-session-{i}" for i in range(32)]
SATURATION_SESSIONS = [f"bench-sat-{i}" for i in range(64)]
SATURATION_IN_FLIGHT = 256  # publishes the closed-loop client keeps in flight
SATURATION_CAPACITY = 512  # every channel's, as the project's default
FULL_INTAKE_BACKOFF = 0.005  # seconds before a publish the full intake refused is sent again
TEXT = "How do JetStream pull consumers apply backpressure when a downstream stream is full?"


@dataclass
class Config:
    """One deployment to measure."""

    name: str
    kind: str  # "project" | "project-up" | "raw" | "raw-async" | "raw-checked" | "faststream"
    instances: int = 1
    scaled: dict[str, int] = field(default_factory=dict)
    """Stages run with this many instances instead (the project's kinds)."""
    env: dict[str, str] = field(default_factory=dict)
    root: Path = ROOT
    """The source tree the project's stages run from (another commit's, with --compare)."""


def checkout(ref: str, workdir: Path) -> Path:
    """The project's tree at `ref`, extracted under `workdir` (kept for later runs)."""
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    target = workdir / f"src-{commit}"
    if not (target / "shared").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True,
                                 capture_output=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def capacity_env(root: Path, stages: tuple[str, ...], capacity: int) -> dict[str, str]:
    """The variables that give every channel `capacity`, in the layout of the tree at `root`
    (trees before the stage graph had one [channels.*] section per channel)."""
    if (root / "shared" / "app").is_dir():
        return {f"ORCH_STAGES__{s.upper()}__CAPACITY": str(capacity) for s in stages}
    channels = ("intake", *stages[1:])
    return {f"ORCH_CHANNELS__{c.upper()}__CAPACITY": str(capacity) for c in channels}


@dataclass
class Measurement:
    """Everything measured for one configuration in one round."""

    config: str
    requests: int
    seconds: float
    throughput: float
    cpu_ms_per_request: float
    server_cpu_ms_per_request: float
    peak_rss_mb: dict[str, float]
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    stage_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    cores_busy: float = 0.0
    """Cores the stages, nats-server and the load driver kept busy during the throughput run."""
    server_cores_busy: float = 0.0
    """Of those, nats-server's."""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Deployment:
    """A configuration running on its own nats-server."""

    def __init__(self, config: Config, capacity: int, workdir: Path) -> None:
        self.config = config
        self.capacity = capacity
        # A fresh store each time: streams left by an earlier run would skew everything.
        self.store = Path(tempfile.mkdtemp(prefix="bench-", dir=workdir))
        self.server = EmbeddedNats(store_dir=self.store)
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.project = config.kind.startswith("project")

    async def start(self) -> None:
        self.server.start()
        url = self.server.url
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
        env.update({"ORCH_NATS_URL": url, "ORCH_LOG_LEVEL": "WARNING", **self.config.env})
        env.update(capacity_env(self.config.root, STAGES, self.capacity))
        # The stages import the tree they run from, ahead of the installed one.
        env["PYTHONPATH"] = os.pathsep.join([str(self.config.root), env.get("PYTHONPATH", "")])
        if not self.project:
            await declare_raw(url, self.capacity, 512)
            module = "bench.faststream_hop" if self.config.kind == "faststream" else "bench.raw_hop"
            idiom = {"raw-async": ["async"], "raw-checked": ["batch", "checked"]}.get(
                self.config.kind, []
            )
            cmds = [(f"h{h}", [sys.executable, "-m", module, url, str(h), str(HOPS), *idiom])
                    for h in range(1, HOPS + 1)]  # fmt: skip
        elif self.config.kind == "project-up":
            cmds = [("up", [sys.executable, "-m", "shared.app", "up"])]
        else:
            cmds = [(s, [sys.executable, "-m", f"services.{s}"]) for s in STAGES]
        cwd = self.config.root if self.project else ROOT
        counts = {name: self.config.scaled.get(name, self.config.instances) for name, _ in cmds}
        for round_ in range(max(counts.values())):
            for name, cmd in cmds:
                if round_ < counts[name]:
                    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL)
                    self.procs.append((name, proc))
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        if self.project:
            from shared.app.load import load
            from shared.status import coverage
            from shared.topology import Topology
            from shared.transport.connection import Bus

            topology = Topology(load(nats_url=self.server.url))
            async with await Bus.connect(self.server.url, name="bench-ready") as bus:
                while not all((await coverage(bus, topology)).values()):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{self.config.name}: stages never started consuming")
                    await asyncio.sleep(0.1)
            return
        nc = await nats.connect(self.server.url)
        jsm = nc.jsm()
        for stream, durable in [(f"RAW_H{h}", f"h{h}") for h in range(1, HOPS + 1)]:
            while True:
                with contextlib.suppress(Exception):
                    info = await jsm.consumer_info(stream, durable)
                    if (info.num_waiting or 0) >= self.config.instances:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.config.name}: {durable} never started consuming")
                await asyncio.sleep(0.1)
        await nc.close()

    def cpu_seconds(self) -> float:
        return sum(_cpu_seconds(p.pid) for _, p in self.procs)

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds so far of each stage (or hop) process, summed over its instances."""
        out: dict[str, float] = {}
        for name, proc in self.procs:
            out[name] = out.get(name, 0.0) + _cpu_seconds(proc.pid)
        return out

    def server_cpu_seconds(self) -> float:
        return _cpu_seconds(self.server.pid)

    def peak_rss(self) -> dict[str, float]:
        out: dict[str, float] = {}
        names = [name for name, _ in self.procs]
        seen: dict[str, int] = {}
        for name, proc in self.procs:
            seen[name] = seen.get(name, 0) + 1
            key = name if names.count(name) == 1 else f"{name}#{seen[name] - 1}"
            out[key] = round(_peak_rss_mb(proc.pid), 1)
        return out

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.server.stop()
        shutil.rmtree(self.store, ignore_errors=True)


class Driver:
    """Publishes requests and collects results for one deployment."""

    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        self.arrivals: dict[str, float] = {}
        self.latencies: list[float] = []
        self.hops: list[list[dict[str, float]]] = []
        self.waiter: asyncio.Future[None] | None = None
        self.expected = 0

    async def connect(self) -> None:
        self.nc = await nats.connect(self.dep.server.url, pending_size=64 * 1024 * 1024)
        self.js = self.nc.jetstream()
        prefix = "orch" if self.dep.project else "raw"
        await self.nc.subscribe(f"{prefix}.results.*", cb=self._on_result,
                                pending_msgs_limit=1_000_000)  # fmt: skip

    async def _on_result(self, msg: nats.aio.msg.Msg) -> None:
        now = time.time()
        if self.dep.project:
            result = orjson.loads(msg.data)
            rid, sent = result["request_id"], result["created_at"]
            if self.keep_hops:
                self.hops.append(result["hops"])
        else:
            rid, sent = msg.headers["Req-Id"], float(msg.headers["Sent-At"])
        if rid in self.arrivals:
            return
        self.arrivals[rid] = now
        self.latencies.append((now - sent) * 1000)
        if len(self.arrivals) >= self.expected and self.waiter and not self.waiter.done():
            self.waiter.set_result(None)

    def _reset(self, expected: int, keep_hops: bool) -> None:
        self.arrivals, self.latencies, self.hops = {}, [], []
        self.expected, self.keep_hops = expected, keep_hops
        self.waiter = asyncio.get_running_loop().create_future()

    async def publish(self, i: int, sessions: list[str] = SESSIONS) -> None:
        session = sessions[i % len(sessions)]
        env = new_request(TEXT, session)
        data = encode(env)
        part = partition_of(session, 8)
        if self.dep.project:
            subject, headers = f"orch.intake.{part}", {"Nats-Msg-Id": f"{env.request_id}:client"}
        else:
            subject = f"raw.h1.{part}"
            headers = {"Nats-Msg-Id": f"{env.request_id}:client", "Req-Id": env.request_id,
                       "Sent-At": repr(env.created_at)}  # fmt: skip
        await self.js.publish(subject, data, headers=headers)

    async def max_throughput(self, n: int) -> tuple[float, float]:
        """Publish n as fast as the intake acks them; seconds until the last result."""
        self._reset(n, keep_hops=False)
        start = time.time()
        window = 512
        for base in range(0, n, window):
            await asyncio.gather(*(self.publish(i) for i in range(base, min(n, base + window))))
        assert self.waiter is not None
        await asyncio.wait_for(self.waiter, timeout=max(120.0, n / 50))
        return max(self.arrivals.values()) - start, start

    async def saturate(self, n: int) -> "Saturation":
        """Closed loop: n requests over 64 sessions with SATURATION_IN_FLIGHT publishes in
        flight, a publish the full intake refused sent again after FULL_INTAKE_BACKOFF, until
        every accepted request has a result or a dead-letter entry."""
        self._reset(n, keep_hops=False)
        todo, refused = iter(range(n)), 0
        start = time.time()

        async def client() -> None:
            nonlocal refused
            for i in todo:
                while True:
                    try:
                        await self.publish(i, SATURATION_SESSIONS)
                        break
                    except nats.js.errors.APIError:  # the intake is full: back off, again
                        refused += 1
                        await asyncio.sleep(FULL_INTAKE_BACKOFF)

        await asyncio.gather(*(client() for _ in range(SATURATION_IN_FLIGHT)))
        deadline, shed = time.monotonic() + max(120.0, n / 20), 0
        while len(self.arrivals) + shed < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.dep.config.name}: {n - len(self.arrivals) - shed} "
                                   "requests neither completed nor dead-lettered")  # fmt: skip
            await asyncio.sleep(0.05)
            shed = await self.dead_lettered()
        done = max(self.arrivals.values(), default=start) - start
        return Saturation(self.dep.config.name, n, round(done, 3),
                          round(len(self.arrivals) / done, 1) if done else 0.0,
                          len(self.arrivals), shed, refused)  # fmt: skip

    async def dead_lettered(self) -> int:
        """Entries in the project's dead-letter stream (a baseline has none)."""
        if not self.dep.project:
            return 0
        return (await self.js.stream_info("ORCH_DLQ")).state.messages

    async def open_loop(self, rate: float, seconds: float) -> dict[str, float]:
        """Publish at `rate`/s for `seconds` regardless of completions; latency percentiles."""
        n = max(1, int(rate * seconds))
        self._reset(n, keep_hops=self.dep.project)
        start = time.monotonic()
        tasks = []
        for i in range(n):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.publish(i)))
        await asyncio.gather(*tasks)
        assert self.waiter is not None
        await asyncio.wait_for(self.waiter, timeout=120)
        lat = self.latencies
        return {
            "rate": round(rate, 1),
            "p50": round(percentile(lat, 50), 2),
            "p90": round(percentile(lat, 90), 2),
            "p99": round(percentile(lat, 99), 2),
            "max": round(max(lat), 2),
        }

    def stage_times(self) -> dict[str, dict[str, float]]:
        waits: dict[str, list[float]] = {}
        handles: dict[str, list[float]] = {}
        for hops in self.hops:
            prev = None
            for hop in hops:
                if prev is not None:
                    waits.setdefault(hop["stage"], []).append((hop["received"] - prev) * 1000)
                handles.setdefault(hop["stage"], []).append((hop["done"] - hop["received"]) * 1000)
                prev = hop["done"]
        return {
            stage: {
                "queue_p50": round(percentile(waits.get(stage, []), 50), 3),
                "handle_p50": round(percentile(handles[stage], 50), 3),
                "handle_p99": round(percentile(handles[stage], 99), 3),
            }
            for stage in handles
        }

    async def close(self) -> None:
        await self.nc.close()


async def measure(config: Config, n: int, rates: list[float], seconds: float,
                  workdir: Path) -> Measurement:  # fmt: skip
    dep = Deployment(config, capacity=n + 1000, workdir=workdir)
    await dep.start()
    driver = Driver(dep)
    try:
        await driver.connect()
        await driver.max_throughput(min(n, 500))  # warm-up: imports, caches, JIT-free paths
        cpu0, srv0, own0 = dep.cpu_seconds(), dep.server_cpu_seconds(), time.process_time()
        elapsed, _ = await driver.max_throughput(n)
        cpu = dep.cpu_seconds() - cpu0
        srv = dep.server_cpu_seconds() - srv0
        own = time.process_time() - own0  # this process: the load driver
        m = Measurement(
            config=config.name,
            requests=n,
            seconds=round(elapsed, 3),
            throughput=round(n / elapsed, 1),
            cpu_ms_per_request=round(cpu / n * 1000, 3),
            server_cpu_ms_per_request=round(srv / n * 1000, 3),
            peak_rss_mb={},
            cores_busy=round((cpu + srv + own) / elapsed, 2),
            server_cores_busy=round(srv / elapsed, 2),
        )
        for rate in rates:
            m.latency[f"{rate:.0f}/s"] = await driver.open_loop(rate, seconds)
            if dep.project and not m.stage_ms:
                m.stage_ms = driver.stage_times()
        m.peak_rss_mb = dep.peak_rss()
        return m
    finally:
        with contextlib.suppress(Exception):
            await driver.close()
        dep.stop()


@dataclass
class Saturation:
    """One closed-loop saturation run: goodput counts completed requests only."""

    config: str
    requests: int
    seconds: float
    goodput: float
    completed: int
    dead_lettered: int
    intake_refusals: int
    cpu_ms_per_request: float = 0.0
    cpu_ms_per_request_by_stage: dict[str, float] = field(default_factory=dict)


async def measure_saturation(config: Config, n: int, workdir: Path) -> Saturation:
    """The closed-loop saturation run of `config` on a fresh server, channels of
    SATURATION_CAPACITY."""
    dep = Deployment(config, capacity=SATURATION_CAPACITY, workdir=workdir)
    await dep.start()
    driver = Driver(dep)
    try:
        await driver.connect()
        await driver.max_throughput(min(n, 300))  # warm-up
        cpu0 = dep.cpu_by_process()
        result = await driver.saturate(n)
        used = {name: cpu - cpu0[name] for name, cpu in dep.cpu_by_process().items()}
        result.cpu_ms_per_request = round(sum(used.values()) / n * 1000, 3)
        result.cpu_ms_per_request_by_stage = {k: round(v / n * 1000, 3) for k, v in used.items()}
        return result
    finally:
        with contextlib.suppress(Exception):
            await driver.close()
        dep.stop()


@dataclass
class Tail:
    """One open-loop run at half of the raw pipeline's max, on a fresh server."""

    config: str
    rate: float
    p50: float
    p90: float
    p99: float
    max: float


async def measure_tail(config: Config, rate: float, seconds: float, workdir: Path) -> Tail:
    """Latency of `config` under open-loop load at `rate` for `seconds`, after a warm-up."""
    dep = Deployment(config, capacity=int(rate * seconds) + 1000, workdir=workdir)
    await dep.start()
    driver = Driver(dep)
    try:
        await driver.connect()
        await driver.max_throughput(500)  # warm-up, as before every measurement
        return Tail(config=config.name, **await driver.open_loop(rate, seconds))
    finally:
        with contextlib.suppress(Exception):
            await driver.close()
        dep.stop()


def _tail_table(runs: list[Tail]) -> str:
    lines = [f"{'tail at half of raw max':<26} {'rate/s':>7} {'p50 ms':>7} {'p99 ms':>7}"]
    lines += [f"{t.config:<26} {t.rate:>7.0f} {t.p50:>7.1f} {t.p99:>7.1f}" for t in runs]
    return "\n".join(lines)


def _saturation_table(runs: list[Saturation]) -> str:
    lines = [f"{'saturation (closed loop)':<26} {'goodput/s':>9} {'completed':>9} {'shed':>5} "
             f"{'refused':>8} {'cpu ms/req':>10}"]  # fmt: skip
    for r in runs:
        lines.append(f"{r.config:<26} {r.goodput:>9.0f} {r.completed:>9} {r.dead_lettered:>5} "
                     f"{r.intake_refusals:>8} {r.cpu_ms_per_request:>10.3f}")  # fmt: skip
    return "\n".join(lines)


def _faststream_available() -> bool:
    try:
        import faststream  # noqa: F401
    except ImportError:
        return False
    return True


def scaling_limit(curve: list[Measurement], cores: int) -> str:
    """What limits the scaling curve (1, 2, 4 instances of one stage), from the cores busy.

    Judged where the curve stops growing: a curve that rises from 1 to 2 instances and is flat
    from 2 to 4 has met its limit at 2.
    """
    rates = ", ".join(f"{m.throughput:.0f}" for m in curve)
    busy = ", ".join(f"{m.cores_busy:.2f}" for m in curve)
    said = f"{rates} req/s with {busy} of {cores} cores busy"
    if curve[-1].throughput > curve[-2].throughput * 1.1:
        return f"{said}: throughput grows with the instances (no limit reached)"
    flat = next(i for i in range(len(curve)) if curve[-1].throughput <= curve[i].throughput * 1.1)
    said += f": throughput grows over the first {flat + 1} runs, then" if flat else ":"
    at_limit = curve[flat:]
    if min(m.cores_busy for m in at_limit) >= 0.9 * cores:
        server = max(m.server_cores_busy for m in at_limit)
        return (f"{said} the machine's CPU is the limit (every core busy; nats-server "
                f"up to {server:.2f} of them)")  # fmt: skip
    if max(m.server_cores_busy for m in at_limit) >= 0.9:
        return f"{said} nats-server is the limit (a core of its own or more)"
    return f"{said} neither the CPU nor nats-server is the limit (look at the stage's waits)"


def _table(results: list[Measurement]) -> str:
    lines = [f"{'configuration':<26} {'req/s':>8} {'cpu ms/req':>10} {'srv ms/req':>10} "
             f"{'max RSS MB':>10}  latency p50/p99 ms at rates"]  # fmt: skip
    for m in results:
        lat = "  ".join(f"{k}: {v['p50']:.1f}/{v['p99']:.1f}" for k, v in m.latency.items())
        rss = max(m.peak_rss_mb.values()) if m.peak_rss_mb else 0
        lines.append(f"{m.config:<26} {m.throughput:>8.0f} {m.cpu_ms_per_request:>10.3f} "
                     f"{m.server_cpu_ms_per_request:>10.3f} {rss:>10.1f}  {lat}")  # fmt: skip
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, object]:
    quick = args.quick
    n = args.requests or (1500 if quick else 20000)
    seconds = args.seconds or (1.5 if quick else 8.0)
    rounds = 1 if quick else args.rounds
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    project, raw = (
        Config("project (5 processes)", "project"),
        Config("raw nats-py (5 processes)", "raw"),
    )
    alternating = [raw, project]
    # The same pipeline recording no metrics: what recording them costs, in this run.
    unmetered = Config("project, metrics off", "project", env={"ORCH_METRICS__ENABLED": "false"})
    # Raw nats-py doing the checks a stage does on each message: what checking costs.
    checked = Config("raw nats-py, checked (5 processes)", "raw-checked")
    if not quick:
        alternating += [unmetered, checked]
    before = None
    if args.compare:
        root = checkout(args.compare, workdir)
        before = Config(f"project@{root.name[4:]} (5 processes)", "project", root=root)
        alternating.append(before)
    results: list[Measurement] = []

    # Find the raw pipeline's max first, then measure latency at fractions of it for all.
    probe = await measure(raw, n, [], seconds, workdir)
    fractions = [0.1, 0.25, 0.5] if not quick else [0.1]
    rates = [probe.throughput * f for f in fractions]
    print(f"raw max ~{probe.throughput:.0f} req/s; latency rates {[round(r) for r in rates]}",
          file=sys.stderr)  # fmt: skip
    for r in range(rounds):
        for config in alternating if r % 2 == 0 else alternating[::-1]:
            m = await measure(config, n, rates, seconds, workdir)
            print(_table([m]).splitlines()[1], file=sys.stderr)
            results.append(m)
    extra = [Config("project (orchestrator up)", "project-up"),
             Config("project (2 per stage)", "project", instances=2)]  # fmt: skip
    if _faststream_available() and not args.no_faststream:
        extra.append(Config("FastStream (5 processes)", "faststream"))
    for config in extra:
        results.append(await measure(config, n, rates if not quick else [], seconds, workdir))

    # Scaling out: more instances of the stage that costs the most CPU per request.
    scaling: list[Measurement] = []
    if not quick:
        for count in (1, 2, 4):
            config = Config(f"project, {count} x inference", "project",
                            scaled={"inference": count})  # fmt: skip
            scaling.append(await measure(config, n, [], seconds, workdir))
            print(_table(scaling[-1:]).splitlines()[1], file=sys.stderr)
        print(f"scaling out inference: {scaling_limit(scaling, os.cpu_count() or 1)}",
              file=sys.stderr)  # fmt: skip

    # Saturation: a closed-loop client against channels of the default size, where a full
    # channel makes itself felt. The strongest plain nats-py idioms are the baselines.
    raw_async = Config("raw nats-py publish_async", "raw-async")
    sat_n = args.saturation_requests or (1500 if quick else 6000)
    saturating = [raw, raw_async, project] + ([before] if before is not None else [])
    if not quick:
        saturating.append(unmetered)
    saturation: list[Saturation] = []
    for r in range(1 if quick else args.saturation_rounds):
        for config in saturating if r % 2 == 0 else saturating[::-1]:
            saturation.append(await measure_saturation(config, sat_n, workdir))
            print(_saturation_table(saturation[-1:]).splitlines()[1], file=sys.stderr)
    if _faststream_available() and not args.no_faststream:
        faststream = Config("FastStream (5 processes)", "faststream")
        saturation.append(await measure_saturation(faststream, sat_n, workdir))

    # The tail at half of raw's max, on its own: more rounds than the latencies above, as
    # both pipelines' p99 there moves by several times from one round to the next.
    tail: list[Tail] = []
    half = probe.throughput * 0.5
    for r in range(1 if quick else args.tail_rounds):
        for config in (raw, project) if r % 2 == 0 else (project, raw):
            tail.append(await measure_tail(config, half, seconds, workdir))
            print(f"tail at {half:.0f}/s  {config.name:<26} p50 {tail[-1].p50:.1f} "
                  f"p99 {tail[-1].p99:.1f} ms", file=sys.stderr)  # fmt: skip

    def best(name: str) -> Measurement:
        return max((m for m in results if m.config == name), key=lambda m: m.throughput)

    p, b = best(project.name), best(raw.name)
    ratios: dict[str, float | list[float]] = {
        "throughput_vs_raw": round(p.throughput / b.throughput, 3)
    }
    if before is not None:
        ratios["throughput_vs_before"] = round(p.throughput / best(before.name).throughput, 3)
    if any(m.config == unmetered.name for m in results):
        off = best(unmetered.name).throughput
        ratios["throughput_metrics_on_vs_off"] = round(p.throughput / off, 3)
    fast = [m for m in results if m.config.startswith("FastStream")]
    if fast:
        ratios["throughput_vs_faststream"] = round(p.throughput / fast[0].throughput, 3)
    for key in p.latency:
        if key in b.latency:
            ratios[f"p99_vs_raw_at_{key}"] = round(p.latency[key]["p99"] / b.latency[key]["p99"], 3)
    if any(m.config == checked.name for m in results):
        c = best(checked.name)
        ratios["throughput_vs_checked_raw"] = round(p.throughput / c.throughput, 3)
        for key in (k for k in p.latency if k in c.latency):
            ratio = p.latency[key]["p99"] / c.latency[key]["p99"]
            ratios[f"p99_vs_checked_raw_at_{key}"] = round(ratio, 3)
    # Round by round as well: the rounds alternate, so each pairs the two under the same
    # conditions, where the best rounds above may come from different moments of the run.
    paired = zip(
        (m for m in results if m.config == project.name),
        (m for m in results if m.config == raw.name),
        strict=True,
    )
    by_round: dict[str, list[float]] = {}
    for pm, bm in paired:
        for key in (k for k in pm.latency if k in bm.latency):
            ratio = round(pm.latency[key]["p99"] / bm.latency[key]["p99"], 3)
            by_round.setdefault(f"p99_vs_raw_at_{key}_by_round", []).append(ratio)
    ratios.update(by_round)

    def best_goodput(name: str) -> Saturation:
        return max((s for s in saturation if s.config == name), key=lambda s: s.goodput)

    sp = best_goodput(project.name)
    for key, name in (("goodput_vs_raw_batch", raw.name), ("goodput_vs_raw_async", raw_async.name),
                      ("goodput_vs_faststream", "FastStream (5 processes)"),
                      *((("goodput_vs_before", before.name),) if before else ())):  # fmt: skip
        if any(s.config == name for s in saturation):
            ratios[key] = round(sp.goodput / best_goodput(name).goodput, 3)
    if any(s.config == unmetered.name for s in saturation):
        off = best_goodput(unmetered.name).goodput
        ratios["goodput_metrics_on_vs_off"] = round(sp.goodput / off, 3)

    # Medians over the rounds, and round by round: a best round is a lucky moment of the
    # machine, and with more rounds each side gets more chances at one.
    def goodputs(name: str) -> list[float]:
        return [s.goodput for s in saturation if s.config == name]

    def compare(key: str, ours: list[float], theirs: list[float]) -> None:
        ratios[f"{key}_median"] = round(median(ours) / median(theirs), 3)
        ratios[f"{key}_by_round"] = [round(a / b, 3) for a, b in zip(ours, theirs, strict=True)]

    compare("goodput_vs_raw_batch", goodputs(project.name), goodputs(raw.name))
    compare("goodput_vs_raw_async", goodputs(project.name), goodputs(raw_async.name))
    if tail:
        compare("p99_vs_raw_at_half", [t.p99 for t in tail if t.config == project.name],
                [t.p99 for t in tail if t.config == raw.name])  # fmt: skip
    ratios["dead_lettered_at_saturation"] = max(
        s.dead_lettered for s in saturation if s.config == project.name
    )
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loop": _loop_name(),
        },
        "code": _code_version(),
        "requests": n,
        "quick": quick,
        "results": [asdict(m) for m in results],
        "scaling": [asdict(m) for m in scaling],
        "scaling_limit": scaling_limit(scaling, os.cpu_count() or 1) if scaling else None,
        "saturation_requests": sat_n,
        "saturation": [asdict(s) for s in saturation],
        "tail": [asdict(t) for t in tail],
        "ratios": ratios,
        "faststream": "installed" if _faststream_available() else "not installed",
        "table": (
            _table(results + scaling)
            + "\n\n"
            + _saturation_table(saturation)
            + ("\n\n" + _tail_table(tail) if tail else "")
        ),
    }


def _code_version() -> str:
    """The commit measured, with "+changes" when the checkout differs from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, timeout=10)  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "shared", "services",
                                "bench/run.py", "bench/raw_hop.py"],
                               cwd=root, capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="~20 s smoke run")
    parser.add_argument("--requests", type=int, help="requests per throughput run")
    parser.add_argument("--seconds", type=float, help="seconds per open-loop latency run")
    parser.add_argument("--saturation-requests", type=int,
                        help="requests per closed-loop saturation run")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (full run)")
    parser.add_argument("--saturation-rounds", type=int, default=5,
                        help="alternating rounds of the saturation run (full run)")  # fmt: skip
    parser.add_argument("--tail-rounds", type=int, default=5,
                        help="alternating rounds at half of raw's max (full run)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--workdir", default="/tmp/orch-bench", help="nats-server stores")
    parser.add_argument(
        "--no-faststream", action="store_true", help="skip FastStream even if installed"
    )
    parser.add_argument(
        "--compare", metavar="REF", help="also run the project at this git commit, alternating"
    )
    args = parser.parse_args()
    report = asyncio.run(run(args))
    print(report["table"])
    print("ratios:", json.dumps(report["ratios"]))
    print("code:", report["code"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
