"""Helpers for integration tests: stage processes, settings, result collection."""

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from services import DEFAULT_GRAPH
from shared.app.load import load
from shared.client import Client
from shared.envelope import Result
from shared.settings import Settings
from shared.topology import Topology
from shared.transport.api import Delivery, Puller
from shared.transport.connection import Bus

if TYPE_CHECKING:
    from shared.app.natsserver import EmbeddedNats
    from shared.runtime.group import StageGroup
    from shared.runtime.loop import StageRuntime
    from shared.status import Status

ROOT = Path(__file__).parents[1]
STAGE_NAMES = list(DEFAULT_GRAPH["stages"])
"""The built-in stages, in pipeline order."""


def stage_env(url: str, **overrides: str) -> dict[str, str]:
    """The environment of a stage process: this one's, minus ORCH_* settings, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_") and k != "NATS_URL"}
    env.update({"ORCH_NATS_URL": url, "ORCH_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"})
    env.update(overrides)
    return env


def settings_for(env: dict[str, str]) -> Settings:
    """The settings a process started with `env` loads."""
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        return load()
    finally:
        os.environ.clear()
        os.environ.update(saved)


class StageProcess:
    """One stage as its own OS process: `orchestrator run <stage>` (`python -m shared.app`),
    or `python -m services.<stage>` with `module`."""

    def __init__(
        self,
        stage: str,
        env: dict[str, str],
        log_dir: Path,
        name: str | None = None,
        *,
        module: bool = False,
    ) -> None:
        self.stage = stage
        self.name = name or stage
        self.command = ["-m", f"services.{stage}"] if module else ["-m", "shared.app", "run", stage]
        self.env = env
        self.log_dir = log_dir
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start (or restart) the process."""
        self.starts += 1
        self.signalled: int | None = None
        log = open(self.log_dir / f"{self.name}-{self.starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, *self.command],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def signal(self, sig: int) -> None:
        """Send `sig` to the process."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.signalled = sig

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye."""
        self.signal(signal.SIGKILL)
        self.wait()

    def wait(self, timeout: float = 60) -> int:
        """Wait for exit; return the exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def log(self) -> str:
        """Everything every run of the process wrote."""
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.log_dir.glob(f"{self.name}-*.log"))
        )

    def stop(self) -> int:
        """SIGTERM and wait for the drain to finish."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        if self.signalled != signal.SIGTERM:  # a second SIGTERM would cut the drain short
            self.signal(signal.SIGTERM)
        try:
            return self.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


async def collect(client: Client, wanted: set[str], timeout: float) -> dict[str, list[Result]]:
    """Read the results stream until every id in `wanted` has a result; all copies per id."""
    seen: dict[str, list[Result]] = {}

    async def read() -> None:
        async for result in client.results():
            seen.setdefault(result.request_id, []).append(result)
            if wanted <= seen.keys():
                return

    try:
        await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        missing = wanted - seen.keys()
        raise AssertionError(f"{len(missing)} of {len(wanted)} results missing") from None
    return seen


async def wait_until_consuming(url: str, settings: Settings, timeout: float = 30.0) -> None:
    """Declare the streams, then wait until every partition of every stage has an owner
    with a pull request waiting."""
    from shared.runtime.group import declare
    from shared.status import until_consuming

    topology = Topology(settings)
    async with await Bus.connect(url, name="test-ready") as bus:
        await declare(bus, topology)
        if not await until_consuming(bus, topology, timeout):
            raise TimeoutError(f"stages not all consuming after {timeout}s")


def orchestrator_command() -> list[str]:
    """The installed `orchestrator` script, as the README runs it."""
    script = Path(sys.executable).parent / "orchestrator"
    found = str(script) if script.exists() else shutil.which("orchestrator")
    assert found, "the orchestrator command is not installed (pip install -e .)"
    return [found]


async def wait_quiet(url: str, settings: Settings, timeout: float = 120.0) -> "Status":
    """Poll `orchestrator status` until nothing is in flight; return that status."""
    from shared.status import read_status

    topology = Topology(settings)
    async with await Bus.connect(url, name="test-status") as bus:
        async with asyncio.timeout(timeout):
            while True:
                status = await read_status(bus, topology)
                busy = status.accounts.in_flight or any(s.ack_pending for s in status.stages)
                if not busy:
                    return status
                await asyncio.sleep(0.2)


def peak_rss_mb(pid: int) -> float:
    """The peak resident set size of a live process, in MB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


async def take(puller: Puller, count: int) -> list[Delivery]:
    """Exactly `count` messages from `puller`, however their delivery is split up."""
    got: list[Delivery] = []
    for _ in range(10):
        got += await puller.fetch(count - len(got), 2.0)
        if len(got) == count:
            return got
    raise AssertionError(f"{len(got)} of {count} messages arrived")


@contextlib.asynccontextmanager
async def in_process_pipeline(
    url: str, **overrides: str
) -> AsyncIterator[tuple[Settings, Bus, Client, "StageGroup"]]:
    """The pipeline's stages on this event loop with `overrides` (ORCH_* settings), a bus and
    a client; everything is stopped afterwards."""
    from shared.runtime.group import StageGroup, declare

    settings = settings_for(stage_env(url, **overrides))
    topology = Topology(settings)
    group = StageGroup(settings, topology.graph.names, topology)
    bus = await Bus.connect(url, name="test-in-process")
    client = await Client.connect(settings, url)
    try:
        await declare(bus, topology)
        group.start(bus)
        yield settings, bus, client, group
    finally:
        await group.stop()
        await client.close()
        await bus.close()


async def busy_runtime(group: "StageGroup", stage: str) -> "StageRuntime":
    """The group's runtime of `stage`, once it has a message under way."""
    runtime = group.runtime(stage)
    async with asyncio.timeout(30):
        while not runtime.in_flight:
            await asyncio.sleep(0.05)
    return runtime


class CuttableProxy:
    """A TCP proxy to a local port whose connections can be cut, as a network failure would."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.up = True
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        """Listen on a free 127.0.0.1 port (`self.port`)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        """Drop every connection and refuse new ones until `restore`."""
        self.up = False
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        """Accept connections again."""
        self.up = True

    async def stop(self) -> None:
        """Cut everything and stop listening."""
        self.cut()
        self._server.close()
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.transport.abort()


class NatsCluster:
    """Three nats-server processes with JetStream forming one cluster on loopback ports."""

    def __init__(self, root: Path, size: int = 3) -> None:
        from shared.app.natsserver import EmbeddedNats, free_port

        routes = [free_port() for _ in range(size)]
        listing = ",".join(f"nats://127.0.0.1:{port}" for port in routes)
        self.nodes = [EmbeddedNats(store_dir=root / f"n{i}",
                                   args=self._args(i, routes, listing, root))
                      for i in range(size)]  # fmt: skip
        self.url = ",".join(node.url for node in self.nodes)
        """Every node, comma-separated: what a client of the cluster is given."""

    @staticmethod
    def _args(i: int, routes: list[int], listing: str, root: Path) -> list[str]:
        # Each node is tagged `node:n<i>`, for placement (tags exist only in a config file).
        root.mkdir(parents=True, exist_ok=True)
        conf = root / f"n{i}.conf"
        conf.write_text(f'server_tags: ["node:n{i}"]\n', encoding="utf-8")
        return ["-c", str(conf), "--server_name", f"n{i}", "--cluster_name", "orch-test",
                "--cluster", f"nats://127.0.0.1:{routes[i]}", "--routes", listing]  # fmt: skip

    def start(self) -> None:
        """Start every node, then wait until JetStream answers (a meta leader is elected)."""
        for node in self.nodes:
            node.start()
        asyncio.run(self.wait_for_jetstream())

    async def wait_for_jetstream(self, timeout: float = 30.0) -> None:
        """Until JetStream's API answers through any node."""
        import nats

        nc = await nats.connect(self.url.split(","))
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        await nc.jetstream().account_info()
                        return
                    except Exception:
                        await asyncio.sleep(0.2)
        finally:
            await nc.close()

    def node_named(self, name: str) -> "EmbeddedNats":
        """The node whose server name is `name` (n0, n1, ...)."""
        return self.nodes[int(name.removeprefix("n"))]

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL)."""
        for node in self.nodes:
            node.stop()


async def publish_all(client: Client, requests: list[tuple[str, str]]) -> tuple[list[str], int]:
    """Publish (text, session) pairs at once; return the ids the intake took and how many it
    refused as Overloaded (any other error is raised)."""
    from shared.errors import Overloaded

    outcomes = await asyncio.gather(
        *(client.publish(text, session) for text, session in requests), return_exceptions=True
    )
    accepted, refused = [], 0
    for outcome in outcomes:
        if isinstance(outcome, Overloaded):
            refused += 1
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            accepted.append(outcome)
    return accepted, refused
