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
from pathlib import Path

from shared.config import CONFIG_ENV
from shared.settings import Settings

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0


def plan(settings: Settings, stages: list[str], instances: int | None) -> list[str]:
    """The stage of every process to run: `instances` each, or each stage's own count."""
    out = []
    for name in stages:
        out += [name] * (instances or settings.stages[name].instances)
    return out


async def supervise(stages: list[str], url: str, config: Path | None) -> int:
    """Run one process per entry of `stages` until a signal; return 0 if all drained cleanly."""
    env = {**os.environ, "ORCH_NATS_URL": url}
    if config is not None:
        env[CONFIG_ENV] = str(config)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)

    def spawn(stage: str) -> subprocess.Popen[bytes]:
        # Own process group: a Ctrl-C on the terminal reaches the supervisor only, which
        # then stops the children in order.
        return subprocess.Popen(
            [sys.executable, "-m", "shared.app", "run", stage], env=env, start_new_session=True
        )

    procs = [(stage, spawn(stage)) for stage in stages]
    log.info("started %d processes: %s", len(procs), ", ".join(s for s, _ in procs))
    while not stopping.is_set():
        for i, (stage, proc) in enumerate(procs):
            if proc.poll() is not None:
                log.warning("%s (pid %d) exited with %s; restarting", stage, proc.pid,
                            proc.returncode)  # fmt: skip
                await asyncio.sleep(RESTART_DELAY)
                procs[i] = (stage, spawn(stage))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), 0.5)
    log.info("stopping %d processes", len(procs))
    for _, proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    codes = [await asyncio.to_thread(proc.wait) for _, proc in procs]
    return 0 if all(code == 0 for code in codes) else 1
