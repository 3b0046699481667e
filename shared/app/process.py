"""Stage processes: connect, declare, run stages until a signal, drain, disconnect."""

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path

from shared.app import heap
from shared.app.discovery import announce
from shared.app.http import Probes, serve_http
from shared.errors import BusError, OrchestratorError
from shared.metrics import Metrics
from shared.runtime.group import HEALTH_STALE, StageGroup, declare
from shared.settings import Settings
from shared.topology import Topology
from shared.transport.connection import Bus
from shared.transport.retry import patiently
from shared.transport.service import Endpoint

log = logging.getLogger(__name__)


async def serve(settings: Settings, stages: list[str], url: str) -> None:
    """Connect, declare, run `stages` until SIGINT/SIGTERM, then drain and disconnect."""
    topology = Topology(settings)
    metrics = Metrics() if settings.metrics.enabled else None
    group = StageGroup(settings, stages, topology, metrics)  # a broken stage fails here
    if len(group.instances) == 1:  # its lines among others' (`up --instances`, a collector)
        tag_logs(group.instances[0])
    async with contextlib.AsyncExitStack() as stack:
        probes = None
        if settings.http.port:  # answering probes from the start: not ready until consuming
            probes = Probes(metrics or Metrics())  # off: the consumer state alone
            await stack.enter_async_context(await _listening(probes, settings))
        await _serve(settings, group, topology, url, probes)


async def _listening(probes: Probes, settings: Settings) -> asyncio.Server:
    host, port = settings.http.host, settings.http.port
    try:
        server = await serve_http(probes, host, port)
    except OSError as exc:
        raise OrchestratorError(f"cannot listen on {host}:{port} (http.port): "
                                f"{exc.strerror or exc}") from None  # fmt: skip
    log.info("metrics and probes on http://%s:%d/metrics, /healthz, /readyz", host, port)
    return server


async def _serve(settings: Settings, group: StageGroup, topology: Topology, url: str,
                 probes: Probes | None) -> None:  # fmt: skip
    stages = [plan.stage.name for plan in group.plans]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    names = "+".join(stages)
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
    if probes is not None:
        probes.connected = lambda: bus.connected
    try:
        for line in await _declared(bus, topology, stop):
            log.info(line)
        heap.settle()  # start-up is over: what exists now lives as long as the process
        group.start(bus)
        if probes is not None:
            probes.group = group
        endpoints = await _announced(bus, group)
        health = asyncio.create_task(_report_health(group, settings.health_file))
        log.info("running %s on %s", ", ".join(rt.instance for rt in group.runtimes), url)
        stopper = asyncio.create_task(stop.wait())
        runner = asyncio.create_task(group.wait())
        await asyncio.wait([stopper, runner], return_when=asyncio.FIRST_COMPLETED)
        log.info("stopping: draining in-flight messages")
        health.cancel()
        await group.stop()
        for endpoint in endpoints:
            await endpoint.stop(drain=1.0)
        stopper.cancel()
        if runner.done():
            runner.result()
        runner.cancel()
    finally:
        await bus.close()
    log.info("stopped")


async def _announced(bus: Bus, group: StageGroup) -> list[Endpoint]:
    # Discovery is for operators: a stage that cannot announce itself still does its work.
    try:
        return await announce(bus, group)
    except BusError as exc:
        log.warning("not answering $SRV requests: %s", exc)
        return []


async def _declared(bus: Bus, topology: Topology, stop: asyncio.Event) -> list[str]:
    """Declare the streams, waiting out broker trouble (a server restarting just as this
    process starts); a configuration the server refuses ends the process."""
    return await patiently(partial(declare, bus, topology), "declaring the streams", stop.is_set)


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


def _log_format(tag: str = "") -> str:
    return f"%(asctime)s %(levelname)s {f'[{tag}] ' if tag else ''}%(name)s: %(message)s"


def configure_logging(verbose: bool = False) -> None:
    """Plain logs on stderr; the level comes from -v or $ORCH_LOG_LEVEL."""
    level = "DEBUG" if verbose else os.environ.get("ORCH_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, stream=sys.stderr, format=_log_format())


def tag_logs(tag: str) -> None:
    """Name `tag` (this process's stage instance) on every line it logs from now on."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(_log_format(tag)))


def install_event_loop_policy() -> None:
    """Use uvloop when it is installed (the `fast` extra): it roughly halves hop latency."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
