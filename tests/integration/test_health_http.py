"""`orchestrator health` as a container's healthcheck runs it: over a stage's HTTP endpoint
when [http] port is set (`/healthz`, `--ready` for `/readyz`), else by the health file."""

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from shared.app.natsserver import free_port
from tests.support import StageProcess, orchestrator_command, stage_env

NOWHERE = "nats://127.0.0.1:1"
"""A NATS URL for health checks, which never connect to NATS."""


def health(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run `orchestrator health ARGS` with `env`."""
    return subprocess.run([*orchestrator_command(), "health", *args], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def until_healthy(env: dict[str, str], *args: str, timeout: float = 30.0) -> None:
    """Run `orchestrator health ARGS` until it exits 0."""
    deadline = time.monotonic() + timeout
    while (done := health(env, *args)).returncode != 0:
        assert time.monotonic() < deadline, done.stderr
        time.sleep(0.2)


def one_line(text: str) -> str:
    """`text`, which must be exactly one line."""
    assert text.count("\n") == 1 and text.endswith("\n"), text
    return text.rstrip("\n")


def test_health_asks_a_running_stage_over_http(nats_server, tmp_path):
    port = free_port()
    env = stage_env(nats_server.url, ORCH_HTTP__PORT=str(port))
    before = health(env)
    assert before.returncode == 1
    assert one_line(before.stderr) == (
        f"unhealthy: http://127.0.0.1:{port}/healthz: Connection refused"
    )
    stage = StageProcess("rag", env, tmp_path)
    try:
        until_healthy(env)
        until_healthy(env, "--ready")
        assert health(env).stdout == ""
    finally:
        assert stage.stop() == 0, stage.log()
    gone = health(env, "--ready")
    assert gone.returncode == 1
    assert one_line(gone.stderr).startswith(f"not ready: http://127.0.0.1:{port}/readyz: ")


def test_a_stage_that_cannot_reach_nats_is_alive_but_not_ready(tmp_path):
    port = free_port()
    # Nothing listens at the NATS URL: the stage runs, keeps trying, and consumes nothing.
    env = stage_env(f"nats://127.0.0.1:{free_port()}", ORCH_HTTP__PORT=str(port))
    stage = StageProcess("assemble", env, tmp_path)
    try:
        until_healthy(env)
        ready = health(env, "--ready")
        assert ready.returncode == 1
        assert one_line(ready.stderr) == (
            f"not ready: http://127.0.0.1:{port}/readyz answered 503: not ready"
        )
    finally:
        stage.stop()


class Canned(BaseHTTPRequestHandler):
    """Answers /healthz 503 (a hung process) and /readyz 200."""

    def do_GET(self) -> None:
        """One canned answer per path."""
        status, body = (503, b"hung\n") if self.path == "/healthz" else (200, b"ready\n")
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


@contextmanager
def canned_endpoint() -> Iterator[int]:
    """A tiny HTTP server on a free 127.0.0.1 port; its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Canned)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_health_reports_what_the_endpoint_answered_in_one_line():
    with canned_endpoint() as port:
        # Listening on every address (as in a container): the probe asks the loopback one.
        env = stage_env(NOWHERE, ORCH_HTTP__PORT=str(port), ORCH_HTTP__HOST="0.0.0.0")
        hung = health(env)
        assert hung.returncode == 1
        assert (
            one_line(hung.stderr)
            == f"unhealthy: http://127.0.0.1:{port}/healthz answered 503: hung"
        )
        assert health(env, "--ready").returncode == 0


def test_an_endpoint_that_does_not_answer_in_time_is_unhealthy():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # connections queue; nobody accepts, nobody answers
        port = listener.getsockname()[1]
        env = stage_env(NOWHERE, ORCH_HTTP__PORT=str(port))
        done = health(env, "--timeout", "0.5")
    assert done.returncode == 1
    assert one_line(done.stderr) == (
        f"unhealthy: http://127.0.0.1:{port}/healthz did not answer within 0.5s"
    )


def test_without_a_port_the_health_file_decides(tmp_path: Path):
    env = stage_env(NOWHERE)
    alive = tmp_path / "alive"
    alive.touch()
    assert health(env, "--file", str(alive)).returncode == 0
    assert health(env | {"ORCH_HEALTH_FILE": str(alive)}).returncode == 0
    old = time.time() - 60
    os.utime(alive, (old, old))
    stale = health(env, "--file", str(alive))
    assert stale.returncode == 1
    assert one_line(stale.stderr) == f"unhealthy: {alive} missing or older than 15s"
    # Readiness is the endpoint's to say; neither a file nor a port: nothing to check.
    ready = health(env, "--ready", "--file", str(alive))
    assert ready.returncode == 2 and "--ready" in ready.stderr
    assert health(env).returncode == 2


def test_a_file_given_is_checked_even_with_a_port(tmp_path: Path):
    alive = tmp_path / "alive"
    alive.touch()
    env = stage_env(NOWHERE, ORCH_HTTP__PORT=str(free_port()))  # nothing listens there
    assert health(env).returncode == 1
    assert health(env, "--file", str(alive)).returncode == 0
