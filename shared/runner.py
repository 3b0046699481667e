"""Running stages: declare the topology, start runtimes, stop them cleanly on a signal."""

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from shared.bus import Bus
from shared.errors import OrchestratorError
from shared.runtime import StageRuntime
from shared.settings import Settings, load_settings
from shared.stage import StageSpec
from shared.topology import Topology

log = logging.getLogger(__name__)

DEFAULT_URL = "nats://127.0.0.1:4222"
HEALTH_STALE = 15.0
"""Seconds without a turn of a fetch loop after which a stage process counts as unhealthy."""


def instance_id(stage: str) -> str:
    """A name for one running instance of `stage`, unique across hosts and restarts.

    It names a consumer and a key, so only letters, digits, `-` and `_` are kept.
    """
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40]
    return f"{stage}-{host}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


async def declare(bus: Bus, settings: Settings) -> list[str]:
    """Create or update every stream; return what was done.

    Consumers are not declared here: each stage instance creates its own, for the partitions
    it owns (shared.affinity).
    """
    topology = Topology(settings)
    return [
        f"stream {stream.name}: {await bus.ensure_stream(stream)}" for stream in topology.streams()
    ]


class StageGroup:
    """Some stages running in this process on one connection, stopped together."""

    def __init__(self, settings: Settings, bus: Bus, specs: Iterable[StageSpec]) -> None:
        self.runtimes = [
            StageRuntime(spec, settings, bus, instance_id(spec.name), spec.build(settings))
            for spec in specs
        ]
        self._drain_timeout = settings.drain_timeout
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start every runtime's loop."""
        self._tasks = [asyncio.create_task(rt.run(), name=rt.instance) for rt in self.runtimes]

    def healthy(self, stale_after: float = HEALTH_STALE) -> bool:
        """True while every runtime's loop is running and went round recently."""
        now = time.monotonic()
        return bool(self._tasks) and all(
            not task.done() and now - rt.last_loop < stale_after
            for task, rt in zip(self._tasks, self.runtimes, strict=True)
        )

    async def wait(self) -> None:
        """Return when any runtime's loop ends; re-raise its error, if any."""
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()

    async def stop(self) -> None:
        """Stop fetching, finish what is in flight (up to drain_timeout), then return."""
        for rt in self.runtimes:
            rt.stop()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=self._drain_timeout)
        for task in pending:
            log.warning("%s did not drain in %.0fs; its messages will be redelivered",
                        task.get_name(), self._drain_timeout)  # fmt: skip
            task.cancel()
        if pending:  # let each hand its partitions over before the connection closes
            await asyncio.wait(pending, timeout=15.0)
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                exc = task.exception() if task.done() and not task.cancelled() else None
                if exc:
                    log.error("%s failed: %r", task.get_name(), exc)


async def serve(settings: Settings, specs: list[StageSpec], url: str) -> None:
    """Connect, declare, run `specs` until SIGINT/SIGTERM, then drain and disconnect."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    names = "+".join(s.name for s in specs)
    connecting = asyncio.create_task(
        Bus.connect(url, name=f"orchestrator-{names}", publish_timeout=settings.publish_timeout)
    )
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([connecting, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not connecting.done():  # stopped while still waiting for NATS
        connecting.cancel()
        log.info("stopped before connecting")
        return
    bus = connecting.result()
    try:
        for line in await declare(bus, settings):
            log.info(line)
        group = StageGroup(settings, bus, specs)
        group.start()
        health = asyncio.create_task(_report_health(group, settings.health_file))
        log.info("running %s on %s", ", ".join(rt.instance for rt in group.runtimes), url)
        stopper = asyncio.create_task(stop.wait())
        runner = asyncio.create_task(group.wait())
        await asyncio.wait([stopper, runner], return_when=asyncio.FIRST_COMPLETED)
        log.info("stopping: draining in-flight messages")
        health.cancel()
        await group.stop()
        stopper.cancel()
        if runner.done():
            runner.result()
        runner.cancel()
    finally:
        await bus.close()
    log.info("stopped")


async def _report_health(group: StageGroup, path: Path | None) -> None:
    # Liveness for container orchestrators: the file's age says when the loops last turned.
    if path is None:
        return
    while True:
        if group.healthy():
            await asyncio.to_thread(path.touch)
        await asyncio.sleep(HEALTH_STALE / 5)


def check_health(path: Path, max_age: float = HEALTH_STALE) -> bool:
    """True if `path` was touched by a healthy stage process within `max_age` seconds."""
    try:
        return time.time() - path.stat().st_mtime < max_age
    except OSError:
        return False


def configure_logging(verbose: bool = False) -> None:
    """Plain logs on stderr; the level comes from -v or $ORCH_LOG_LEVEL."""
    level = "DEBUG" if verbose else os.environ.get("ORCH_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def install_event_loop_policy() -> None:
    """Use uvloop when it is installed (the `fast` extra): it roughly halves hop latency."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def stage_main(spec: StageSpec) -> None:
    """Entry point of `python -m services.<stage>`: settings from the environment."""
    configure_logging()
    try:
        settings = load_settings()
        install_event_loop_policy()
        asyncio.run(serve(settings, [spec], settings.nats_url or DEFAULT_URL))
    except OrchestratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
