"""`orchestrator up` with several instances: each stage instance as its own process.

Separate processes let one machine use all its cores. The supervisor forwards SIGINT/SIGTERM
(each child drains, then exits) and restarts a child that dies on its own.
"""

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shared.config import CONFIG_ENV
from shared.settings import Settings

INSTANCE_ENV = "ORCH_INSTANCE"
HTTP_PORT_ENV = "ORCH_HTTP__PORT"

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0
"""Seconds before the first restart of a child that died; doubled after each fast crash."""
RESTART_DELAY_MAX = 30.0
FAST_CRASH = 30.0
"""A child that dies within this many seconds of its start crashed fast."""
GIVE_UP_AFTER = 5
"""Fast crashes in a row of one child after which the supervisor stops everything."""


class Restarts:
    """When to restart a child that died, and when to stop trying: a delay that doubles with
    each fast crash in a row (up to RESTART_DELAY_MAX), reset by a child that ran a while."""

    def __init__(self) -> None:
        self.fast_crashes = 0

    def delay(self, ran_for: float) -> float | None:
        """Seconds to wait before the restart of a child that ran `ran_for` seconds; None:
        give up."""
        self.fast_crashes = self.fast_crashes + 1 if ran_for < FAST_CRASH else 0
        if self.fast_crashes >= GIVE_UP_AFTER:
            return None
        return min(RESTART_DELAY_MAX, RESTART_DELAY * 2 ** max(self.fast_crashes - 1, 0))


def plan(settings: Settings, stages: list[str], instances: int | None) -> list[str]:
    """The stage of every process to run: `instances` each, or each stage's own count."""
    out = []
    for name in stages:
        out += [name] * (instances or settings.stages[name].instances)
    return out


async def supervise(stages: list[str], url: str, config: Path | None, http_port: int = 0) -> int:
    """Run one process per entry of `stages` until a signal; return 0 if all drained cleanly.

    A child that dies on its own is restarted after a delay that doubles while it keeps
    crashing fast; after GIVE_UP_AFTER fast crashes in a row everything is stopped and 1 is
    returned.
    """
    env = {**os.environ, "ORCH_NATS_URL": url}
    if config is not None:
        env[CONFIG_ENV] = str(config)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)

    slots = [stages[:i].count(stage) for i, stage in enumerate(stages)]

    def spawn(i: int) -> tuple[subprocess.Popen[bytes], float]:
        # Own process group: a Ctrl-C on the terminal reaches the supervisor only, which
        # then stops the children in order. A restarted child keeps its instance name, so it
        # takes its partitions back at once.
        child = {**env, INSTANCE_ENV: f"{{host}}-{os.getpid()}-{slots[i]}"}
        if http_port:  # one port each on this host: the configured one, then the next ones
            child[HTTP_PORT_ENV] = str(http_port + i)
        proc = subprocess.Popen([sys.executable, "-m", "shared.app", "run", stages[i]],
                                env=child, start_new_session=True)  # fmt: skip
        return proc, time.monotonic()

    procs = [(stage, *spawn(i)) for i, stage in enumerate(stages)]
    restarts = [Restarts() for _ in procs]
    due: dict[int, float] = {}  # child index -> when its restart is due
    gave_up = False
    log.info("started %d processes: %s", len(procs), ", ".join(s for s, _, _ in procs))
    while not stopping.is_set() and not gave_up:
        now = time.monotonic()
        for i, (stage, proc, started) in enumerate(procs):
            if i in due:
                if now >= due[i]:
                    del due[i]
                    procs[i] = (stage, *spawn(i))
                continue
            if proc.poll() is None:
                continue
            delay = restarts[i].delay(now - started)
            if delay is None:
                log.error("%s exited %d times in a row within %gs of starting (last with "
                          "code %s); giving up: its own output above says why", stage,
                          GIVE_UP_AFTER, FAST_CRASH, proc.returncode)  # fmt: skip
                gave_up = True
                break
            log.warning("%s (pid %d) exited with %s; restarting in %gs", stage, proc.pid,
                        proc.returncode, delay)  # fmt: skip
            due[i] = now + delay
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), 0.2)
    log.info("stopping %d processes", len(procs))
    for _, proc, _ in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    codes = [await asyncio.to_thread(proc.wait) for _, proc, _ in procs]
    return 0 if not gave_up and all(code == 0 for code in codes) else 1
