"""Open-loop load at fixed rates: latency, and the CPU each request costs the stages and the
server, for the project (and another commit of it) against the raw nats-py pipeline.

    python -m bench.light [--rates 340 1700] [--seconds 6] [--rounds 2] [--compare REF]

At a rate well below the maximum a stage handles its messages one at a time, and what a
message costs is mostly wake-ups: of the stage for the delivery and for its output's ack, and
of nats-server for everything the stage writes. `bench.run` measures CPU only flat out; this
measures it where the latency targets are set (10 % and 50 % of the raw pipeline's max), so a
change to how a stage talks to the server can be judged there. `cores busy` is the CPU of the
stages, the server and the load driver over the run's wall time: near the machine's cores,
latency is mostly waiting for one. With `--checked` the raw pipeline also runs with each hop
doing what a project stage does to a message besides moving it (decode and validate the
envelope, append a hop record, encode it). Configurations alternate over the rounds, each on a
fresh server.
"""

import argparse
import asyncio
import contextlib
import time
from pathlib import Path

from bench.run import Config, Deployment, Driver, checkout


async def measure(config: Config, rates: list[float], seconds: float, workdir: Path) -> None:
    """Print, per rate, p50/p99 and CPU ms per request of the stages and of nats-server."""
    dep = Deployment(config, capacity=100_000, workdir=workdir)
    await dep.start()
    driver = Driver(dep)
    try:
        await driver.connect()
        await driver.max_throughput(500)  # warm-up
        for rate in rates:
            cpu0, srv0, own0 = dep.cpu_seconds(), dep.server_cpu_seconds(), time.process_time()
            start = time.monotonic()
            latency = await driver.open_loop(rate, seconds)
            elapsed, n = time.monotonic() - start, max(1, int(rate * seconds))
            stages, server = dep.cpu_seconds() - cpu0, dep.server_cpu_seconds() - srv0
            busy = (stages + server + time.process_time() - own0) / elapsed  # own: the driver
            print(f"{config.name:<30} {rate:>6.0f}/s  p50 {latency['p50']:>7.2f}  "
                  f"p99 {latency['p99']:>7.2f} ms  stage CPU {stages / n * 1000:.3f}  "
                  f"server CPU {server / n * 1000:.3f} ms/req  cores busy {busy:.2f}",
                  flush=True)  # fmt: skip
    finally:
        with contextlib.suppress(Exception):
            await driver.close()
        dep.stop()


async def run(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    configs = [Config("raw nats-py", "raw"), Config("project", "project")]
    if args.checked:
        configs.insert(1, Config("raw nats-py, checked", "raw-checked"))
    if args.compare:
        root = checkout(args.compare, workdir)
        configs.append(Config(f"project@{root.name[4:]}", "project", root=root))
    for r in range(args.rounds):
        for config in configs if r % 2 == 0 else configs[::-1]:
            await measure(config, args.rates, args.seconds, workdir)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", type=float, nargs="+", default=[340.0, 1700.0],
                        help="requests per second, each run in turn")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds per rate")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--compare", metavar="REF", help="also the project at this commit")
    parser.add_argument("--checked", action="store_true",
                        help="also raw nats-py checking every message as a stage does")  # fmt: skip
    parser.add_argument("--workdir", default="/tmp/orch-bench", help="nats-server stores")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
