"""A stage process's HTTP endpoint: `/metrics` for Prometheus, `/healthz` and `/readyz` probes.

- `/healthz`: 200 while the process runs and its fetch loops keep turning (503 once one has
  stopped turning for HEALTH_STALE seconds: hung);
- `/readyz`: 200 while connected and every stage in the process consumes; 503 before that
  (connecting, declaring, joining) and while draining;
- `/metrics`: what the stages recorded (shared.metrics), with each instance's consumer state
  read from JetStream at the scrape.

A few GET requests a second from probes and scrapers: a minimal HTTP/1.1 server on the
process's event loop serves them, one response per connection.
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable

from shared.errors import BusError
from shared.metrics import Metrics
from shared.runtime.group import StageGroup

log = logging.getLogger(__name__)

READ_TIMEOUT = 5.0
"""Seconds a client has to send its request."""
SCRAPE_TIMEOUT = 2.0
"""Seconds the consumer state may take to read at a scrape; past that the last values stand."""


class Probes:
    """What the endpoint reports: set as the process starts, runs and stops."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.group: StageGroup | None = None
        """The stages, once they are started."""
        self.connected: Callable[[], bool] = lambda: False
        """Whether the connection to NATS is up."""
        self._partitions: set[tuple[str, str]] = set()  # (stage, partition) reported

    def alive(self) -> bool:
        """The process runs and, once stages run, their loops keep turning."""
        return self.group is None or not self.group.runtimes or self.group.healthy()

    def ready(self) -> bool:
        """Connected, and every stage consuming (not starting, not draining)."""
        return self.group is not None and self.connected() and self.group.ready()

    async def refresh(self) -> None:
        """Read each instance's consumer state into the gauges."""
        if self.group is None:
            return
        m = self.metrics
        reported: set[tuple[str, str]] = set()
        for rt in self.group.runtimes:
            ids = (rt.name, rt.instance)
            affinity = rt.affinity
            m.partitions.value(*ids).set(len(affinity.owned) if affinity else 0)
            if affinity is None or not affinity.owned:
                m.pending.value(*ids).set(0)
                m.ack_pending.value(*ids).set(0)
                continue
            try:
                view = await asyncio.wait_for(rt.consumer_view(), SCRAPE_TIMEOUT)
            except (BusError, TimeoutError) as exc:
                log.debug("%s: consumer state not read: %s", rt.instance, exc)
                continue
            if view is not None:
                m.pending.value(*ids).set(view.state.pending)
                m.ack_pending.value(*ids).set(view.state.ack_pending)
            with contextlib.suppress(BusError, TimeoutError):
                counts = await asyncio.wait_for(rt.partition_counts(), SCRAPE_TIMEOUT)
                for partition, count in counts.items():
                    m.channel.value(rt.name, str(partition)).set(count)
                    reported.add((rt.name, str(partition)))
        for gone in self._partitions - reported:  # moved to another instance: it reports them
            with contextlib.suppress(KeyError):
                m.channel.remove(*gone)
        self._partitions = reported


async def serve_http(probes: Probes, host: str, port: int) -> asyncio.Server:
    """Start answering on host:port (port 0 is not "off" here: the caller decides that)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                request = await reader.readuntil(b"\r\n\r\n")
            method, _, rest = request.partition(b" ")
            path = rest.split(b" ", 1)[0].split(b"?", 1)[0].decode("ascii", "replace")
            status, body, kind = await _route(probes, method.decode("ascii", "replace"), path)
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")  # fmt: skip
            writer.write(head.encode("ascii") + (body if method != b"HEAD" else b""))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):  # fmt: skip
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(answer, host, port)


TEXT = "text/plain; charset=utf-8"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


async def _route(probes: Probes, method: str, path: str) -> tuple[str, bytes, str]:
    if method not in ("GET", "HEAD"):
        return "405 Method Not Allowed", b"GET only\n", TEXT
    if path == "/healthz":
        ok = probes.alive()
        return ("200 OK", b"ok\n", TEXT) if ok else ("503 Service Unavailable", b"hung\n", TEXT)
    if path == "/readyz":
        if probes.ready():
            return "200 OK", b"ready\n", TEXT
        return "503 Service Unavailable", b"not ready\n", TEXT
    if path == "/metrics":
        await probes.refresh()
        return "200 OK", probes.metrics.exposition(), PROMETHEUS
    return "404 Not Found", b"/metrics, /healthz, /readyz\n", TEXT
