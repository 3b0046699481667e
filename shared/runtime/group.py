"""Running stages in one process: declaring the streams, starting runtimes, stopping them."""

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable

from shared.limits import check_limits
from shared.metrics import Metrics
from shared.runtime.loop import StageRuntime
from shared.runtime.plan import plan_stage
from shared.settings import Settings
from shared.topology import Topology
from shared.transport.api import MessageBus

log = logging.getLogger(__name__)

HEALTH_STALE = 15.0
"""Seconds without a turn of a fetch loop after which a stage process counts as unhealthy."""


def instance_id(stage: str, name: str | None = None) -> str:
    """The name of this process's instance of `stage`: `name` (the `instance` setting, `{host}`
    standing for the host name) if given, the same across restarts; else one unique across
    hosts and restarts.

    It names a consumer and a key, so only letters, digits, `-` and `_` are kept.
    """
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40]
    if name is not None:
        return f"{stage}-{name.replace('{host}', host)}"
    return f"{stage}-{host}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


async def declare(bus: MessageBus, topology: Topology) -> list[str]:
    """Create or update every stream; return what was done.

    Consumers are not declared here: each stage instance creates its own, for the partitions
    it owns (shared.runtime.affinity).
    """
    return [
        f"stream {stream.name}: {await bus.admin.ensure_stream(stream)}"
        for stream in topology.streams()
    ]


class StageGroup:
    """Some stages running in this process on one connection, stopped together.

    Their factories are found and their options checked when the group is made, so a broken
    declaration fails before anything starts; each is set up when its runtime starts.
    """

    def __init__(
        self,
        settings: Settings,
        stages: Iterable[str],
        topology: Topology | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        """Where the stages record their metrics (None: they record none)."""
        self.topology = topology or Topology(settings)
        self.plans = [plan_stage(settings, self.topology.graph, name) for name in stages]
        self.instances = [instance_id(plan.stage.name, settings.instance) for plan in self.plans]
        """The instance each stage runs as here."""
        self.runtimes: list[StageRuntime] = []
        """One per stage, once started."""
        self._drain_timeout = settings.drain_timeout
        self._tasks: list[asyncio.Task[None]] = []

    def runtime(self, stage: str) -> StageRuntime:
        """The (first) runtime of `stage` in this group."""
        return next(rt for rt in self.runtimes if rt.name == stage)

    def start(self, bus: MessageBus) -> None:
        """Start a runtime for every stage on `bus` (ConfigError if a request accepted at the
        intake might not fit the server's messages)."""
        check_limits(self.settings.max_message_bytes, bus.max_payload)
        self.runtimes = [
            StageRuntime(
                plan,
                self.settings,
                self.topology,
                bus,
                instance,
                self.metrics,
            )
            for plan, instance in zip(self.plans, self.instances, strict=True)
        ]
        self._tasks = [asyncio.create_task(rt.run(), name=rt.instance) for rt in self.runtimes]

    @property
    def running(self) -> bool:
        """Whether every runtime's loop is still running."""
        return bool(self._tasks) and not any(task.done() for task in self._tasks)

    def ready(self) -> bool:
        """Every runtime is running and consuming (not starting, not draining)."""
        return self.running and all(rt.ready for rt in self.runtimes)

    def healthy(self, stale_after: float = HEALTH_STALE) -> bool:
        """True while every runtime's loop is running and went round recently."""
        now = time.monotonic()
        return self.running and all(now - rt.last_loop < stale_after for rt in self.runtimes)

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
            log.warning("%s did not drain in %gs; its messages will be redelivered",
                        task.get_name(), self._drain_timeout)  # fmt: skip
            task.cancel()
        if pending:  # let each hand its partitions over before the connection closes
            await asyncio.wait(pending, timeout=15.0)
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                exc = task.exception() if task.done() and not task.cancelled() else None
                if exc:
                    log.error("%s failed: %r", task.get_name(), exc)
