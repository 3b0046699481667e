"""Profile one hop: the project's assemble stage against the raw baseline's second hop, each
sampled with py-spy while its pipeline runs flat out, or at saturation (`--saturation`: the
closed-loop load of `bench.run` against channels of the default size, where full channels push
back).

    python -m bench.profile [--saturation] [--requests N] [--seconds S] [--out DIR]

Writes py-spy's folded stacks (`<name>.folded`, one stack per line with its sample count;
load them into speedscope.app or flamegraph.pl) and a summary, `summary.txt`: samples per
message and the functions where the samples land (self) and that they pass through
(inclusive). Needs `py-spy` (the `dev` extra) and permission to ptrace the stage processes.
"""

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.run import SATURATION_CAPACITY, Config, Deployment, Driver

TARGETS = {
    "project": ("assemble", Config("project", "project")),
    "raw": ("h2", Config("raw", "raw")),
}


async def profile(
    name: str, requests: int, seconds: int, rate: int, out: Path, saturation: bool
) -> str:
    """Run one deployment flat out (or saturated), sample its second hop, return a summary."""
    proc_name, config = TARGETS[name]
    workdir = Path("/tmp/orch-bench")
    workdir.mkdir(parents=True, exist_ok=True)
    capacity = SATURATION_CAPACITY if saturation else requests + 1000
    dep = Deployment(config, capacity=capacity, workdir=workdir)
    await dep.start()
    driver = Driver(dep)
    folded = out / f"{name}-{proc_name}.folded"
    try:
        await driver.connect()
        await driver.max_throughput(500)  # warm-up
        pid = next(p.pid for n, p in dep.procs if n == proc_name)
        cmd = [_py_spy(), "record", "-r", str(rate), "-d", str(seconds), "-f", "raw",
               "-o", str(folded), "-p", str(pid)]  # fmt: skip
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        await asyncio.sleep(0.5)  # let py-spy attach before the load starts
        start = time.monotonic()
        if saturation:
            elapsed = (await driver.saturate(requests)).seconds
        else:
            elapsed, _ = await driver.max_throughput(requests)
        _, err = await asyncio.to_thread(spy.communicate)
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')}")
        sampled = min(seconds, time.monotonic() - start)
        throughput = requests / elapsed
    finally:
        await driver.close()
        dep.stop()
    return summarize(name, proc_name, folded, throughput, sampled)


def summarize(name: str, proc: str, folded: Path, throughput: float, seconds: float) -> str:
    """The top functions by self and inclusive samples in a folded-stacks file."""
    own: collections.Counter[str] = collections.Counter()
    through: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            through[frame] += count
    if total == 0:
        return f"{name}: no samples\n"
    messages = throughput * seconds
    lines = [
        f"== {name}: process {proc}, {total} samples over {seconds:.1f} s at {throughput:.0f} "
        f"msg/s ({total / messages * 1000:.1f} samples per 1000 messages)",
        "  self %  function",
    ]
    lines += [f"  {c / total * 100:5.1f}  {f}" for f, c in own.most_common(25)]
    lines.append("  incl %  function")
    lines += [f"  {c / total * 100:5.1f}  {f}" for f, c in through.most_common(40)]
    return "\n".join(lines) + "\n"


def _py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"  # a virtualenv's, when not activated
    return str(beside) if beside.exists() else (shutil.which("py-spy") or "")


def _short(frame: str) -> str:
    # "publish (nats/js/client.py:123)" -> "publish (nats/js/client.py)": lines split a
    # function's samples for no benefit here.
    func, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{func} ({path})" if path else func


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=16000, help="requests per run")
    parser.add_argument("--seconds", type=int, default=6, help="seconds to sample")
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--out", type=Path, default=Path("bench/results/profile"))
    parser.add_argument("--saturation", action="store_true",
                        help="closed-loop load against channels of the default size")  # fmt: skip
    args = parser.parse_args()
    if not _py_spy():
        sys.exit("error: py-spy is not installed (pip install py-spy)")
    args.out.mkdir(parents=True, exist_ok=True)
    summaries = [
        asyncio.run(
            profile(name, args.requests, args.seconds, args.rate, args.out, args.saturation)
        )
        for name in ("raw", "project")
    ]
    text = "\n".join(summaries)
    (args.out / "summary.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
