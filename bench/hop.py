"""CPU per message of each hop on its own, with a full backlog: the project's stages against
the raw nats-py hops, in one process, alternating.

    python -m bench.hop [--requests N] [--rounds R] [--compare REF] [--json FILE]

For each pipeline, N requests are stored in the first channel; then each stage (hop) runs
alone, in this process, until all N are stored in the next channel, and the CPU time this
process used meanwhile, divided by N, is its cost per message. Every stage starts with a
full channel, as at saturation, and nothing else competes for the CPU but nats-server (on
the other core), so the figures are far steadier than the whole pipeline's under load: this
is the measure for a change to the per-message path (`--compare REF` runs the project as of
another commit too, alternating). Each pipeline runs in a process of its own. The pipeline's
own throughput and goodput are `bench.run`'s.
"""

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import orjson
from nats.js.client import JetStreamContext

from bench import raw_hop
from bench.run import ROOT, STAGES, TEXT, _code_version, checkout
from bench.topology import HOPS, declare_raw
from shared.app.load import load
from shared.app.natsserver import EmbeddedNats
from shared.envelope import encode, new_request
from shared.metrics import Metrics
from shared.partition import partition_of
from shared.runtime.group import StageGroup, declare
from shared.topology import RESULTS, Topology
from shared.transport.connection import Bus

SESSIONS = [f"hop-session-{i}" for i in range(64)]
POLL = 0.02  # seconds between looks at the next channel


async def _preload(js: JetStreamContext, n: int, subject: Callable[[str, str], str],
                   raw: bool) -> None:  # fmt: skip
    """Store n requests in the first channel (publish_async, acks awaited per batch)."""
    for base in range(0, n, 512):
        acks = []
        for i in range(base, min(n, base + 512)):
            session = SESSIONS[i % len(SESSIONS)]
            env = new_request(TEXT, session)
            headers = {"Nats-Msg-Id": f"{env.request_id}:client"}
            if raw:
                headers.update({"Req-Id": env.request_id, "Sent-At": repr(env.created_at)})
            acks.append(await js.publish_async(subject(session, env.request_id), encode(env),
                                               headers=headers))  # fmt: skip
        await asyncio.gather(*acks)


async def _timed(run: Callable[[asyncio.Event], Awaitable[None]],
                 stored: Callable[[], Awaitable[int]], n: int) -> float:  # fmt: skip
    """CPU milliseconds per message of `run` until `stored()` reaches n."""
    stop = asyncio.Event()
    cpu0 = time.process_time()
    task = asyncio.create_task(run(stop))
    deadline = time.monotonic() + max(60.0, n / 100)
    while await stored() < n:
        if task.done():
            task.result()
            raise RuntimeError("the hop stopped before it was done")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {await stored()} of {n} stored")
        await asyncio.sleep(POLL)
    cpu = time.process_time() - cpu0
    stop.set()
    await asyncio.wait_for(task, 30)
    return cpu / n * 1000


async def project(url: str, n: int) -> dict[str, float]:
    """CPU ms per message of each project stage."""
    settings = load(nats_url=url, **{"stages": {s: {"capacity": n + 1000} for s in STAGES}})
    topology = Topology(settings)
    costs: dict[str, float] = {}
    # Recording metrics as a stage process does (shared.app.process), unless they are off.
    metrics = Metrics() if settings.metrics.enabled else None
    async with await Bus.connect(url, name="bench-hop") as bus:
        await declare(bus, topology)
        _settle_heap()
        nc = await nats.connect(url)
        js = nc.jetstream()
        intake = topology.graph[STAGES[0]].channel
        await _preload(js, n, lambda s, _: topology.subject_for(intake, s), raw=False)
        for i, stage in enumerate(STAGES):
            out = (topology.stream_name(topology.graph[STAGES[i + 1]].channel)
                   if i + 1 < len(STAGES) else topology.stream_name(RESULTS))  # fmt: skip

            async def run(stop: asyncio.Event, stage: str = stage) -> None:
                group = StageGroup(settings, [stage], topology, metrics)
                group.start(bus)
                await stop.wait()
                await group.stop()

            async def stored(out: str = out) -> int:
                return (await js.stream_info(out)).state.messages

            costs[stage] = await _timed(run, stored, n)
        await nc.close()
    return costs


def _settle_heap() -> None:
    """What a stage process does once started (commits before it did nothing)."""
    try:
        from shared.app import heap
    except ImportError:
        return
    heap.settle()


async def raw(url: str, n: int) -> dict[str, float]:
    """CPU ms per message of each raw hop (`js.publish` gathered per batch)."""
    await declare_raw(url, n + 1000, 512)
    nc = await nats.connect(url)
    js = nc.jetstream()
    await _preload(js, n, lambda s, _: f"raw.h1.{partition_of(s, 8)}", raw=True)
    costs: dict[str, float] = {}
    for hop in range(1, HOPS + 1):
        out = f"RAW_H{hop + 1}" if hop < HOPS else "RAW_RESULTS"

        async def run(stop: asyncio.Event, hop: int = hop) -> None:
            await raw_hop.main(url, hop, HOPS, "batch", stop=stop)

        async def stored(out: str = out) -> int:
            return (await js.stream_info(out)).state.messages

        costs[f"h{hop}"] = await _timed(run, stored, n)
    await nc.close()
    return costs


async def child(kind: str, n: int, workdir: Path) -> dict[str, float]:
    """One pipeline's hops on a fresh server, in this process."""
    store = Path(tempfile.mkdtemp(prefix="hop-", dir=workdir))
    server = EmbeddedNats(store_dir=store)
    server.start()
    try:
        return await (project if kind == "project" else raw)(server.url, n)
    finally:
        server.stop()
        shutil.rmtree(store, ignore_errors=True)


def measure(kind: str, n: int, workdir: Path, root: Path = ROOT) -> dict[str, float]:
    """One pipeline's hops, in a process of its own running the tree at `root`."""
    if root != ROOT:  # this script, beside another commit's stages
        shutil.copy(Path(__file__), root / "bench" / "hop.py")
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "bench.hop", "--child", kind, "--requests", str(n),
           "--workdir", str(workdir)]  # fmt: skip
    out = subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, text=True)
    return {k: float(v) for k, v in json.loads(out.stdout.splitlines()[-1]).items()}


def run(args: argparse.Namespace) -> dict[str, object]:
    """Alternate the pipelines over the rounds; report each run and the best of each."""
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pipelines: list[tuple[str, str, Path]] = [("raw", "raw", ROOT), ("project", "project", ROOT)]
    if args.compare:
        root = checkout(args.compare, workdir)
        pipelines.append((f"project@{root.name[4:]}", "project", root))
    runs: list[dict[str, object]] = []
    for r in range(args.rounds):
        for name, kind, root in pipelines if r % 2 == 0 else pipelines[::-1]:
            costs = measure(kind, args.requests, workdir, root)
            total = round(sum(costs.values()), 4)
            rounded = {k: round(v, 4) for k, v in costs.items()}
            runs.append({"pipeline": name, "ms_per_message": rounded, "total": total})
            print(
                f"{name:<16} total {total:.4f} ms/msg  "
                + "  ".join(f"{k} {v:.4f}" for k, v in costs.items()),
                file=sys.stderr,
            )
    best = {name: min(float(r["total"]) for r in runs if r["pipeline"] == name)  # type: ignore[arg-type]
            for name, _, _ in pipelines}  # fmt: skip
    ratios = {"project_vs_raw": round(best["project"] / best["raw"], 3)}
    if args.compare:
        ratios["project_vs_before"] = round(best["project"] / best[pipelines[2][0]], 3)
    return {"code": _code_version(), "requests": args.requests, "runs": runs, "best": best,
            "ratios": ratios}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10000, help="messages per hop")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--workdir", default="/tmp/orch-bench", help="nats-server stores")
    parser.add_argument(
        "--compare", metavar="REF", help="also run the project at this git commit, alternating"
    )
    parser.add_argument("--child", choices=("project", "raw"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one pipeline, measured in this process
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        print(json.dumps(asyncio.run(child(args.child, args.requests, Path(args.workdir)))))
        return
    report = run(args)
    print(json.dumps({k: report[k] for k in ("code", "best", "ratios")}))
    if args.json:
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")


if __name__ == "__main__":
    main()
