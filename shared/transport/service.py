"""Services over NATS: an endpoint answering in a queue group with a stream of replies, as
the NATS micro protocol has it (so `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS` work and
`nats micro ls` lists it), and the client side, a request whose replies are read as a stream.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.micro import add_service
from nats.micro.request import Request

from shared.errors import BusError
from shared.transport.api import StoredMessage

Reply = Callable[[bytes], Awaitable[None]]
"""Sends one reply message to the requester."""
Handler = Callable[[bytes, Mapping[str, str], Reply], Awaitable[None]]
"""Handles one request: its payload, its headers, and how to reply (any number of times)."""


class Endpoint:
    """A running service endpoint; `stop` ends it."""

    def __init__(self, service: Any, tasks: set[asyncio.Task[None]]) -> None:
        self._service = service
        self._tasks = tasks

    @property
    def in_flight(self) -> int:
        """Requests being handled."""
        return len(self._tasks)

    async def stop(self, drain: float = 30.0) -> None:
        """Take no more requests; wait up to `drain` seconds for those under way."""
        with contextlib.suppress(nats.errors.Error):
            await self._service.stop()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=drain)
            for task in pending:
                task.cancel()


async def serve(
    nc: NatsClient,
    *,
    name: str,
    version: str,
    description: str,
    subject: str,
    queue_group: str,
    handler: Handler,
    metadata: Mapping[str, str] | None = None,
    endpoint: str = "generate",
    stats: Callable[[], Any] | None = None,
) -> Endpoint:
    """Answer requests on `subject` in `queue_group`, each in a task of its own (the micro
    library would run them one at a time). `stats` gives the endpoint's `data` in answers to
    `$SRV.STATS`."""
    tasks: set[asyncio.Task[None]] = set()

    async def take(request: Request) -> None:
        msg = request._msg  # the reply subject; micro's Request answers only once
        reply_to = msg.reply
        if not reply_to:
            return

        async def reply(data: bytes) -> None:
            await nc.publish(reply_to, data)

        task = asyncio.create_task(handler(request.data, request.headers or {}, reply))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    try:
        data = (lambda _: stats()) if stats else None
        service = await add_service(nc, name=name, version=version, description=description,
                                    metadata=dict(metadata or {}), stats_handler=data)  # fmt: skip
        await service.add_endpoint(name=endpoint, subject=subject, queue_group=queue_group,
                                   handler=take)  # fmt: skip
    except nats.errors.Error as exc:
        raise BusError(f"cannot serve {subject}: {exc!r}") from None
    return Endpoint(service, tasks)


async def request_stream(
    nc: NatsClient, subject: str, data: bytes, headers: Mapping[str, str] | None = None
) -> AsyncIterator[StoredMessage]:
    """Send a request to `subject` and yield its replies as they come, until the caller
    stops; BusError at once when nobody serves the subject."""
    inbox = nc.new_inbox()
    queue: asyncio.Queue[StoredMessage] = asyncio.Queue()

    async def receive(msg: Any) -> None:
        queue.put_nowait(StoredMessage(0, msg.subject, msg.data, msg.headers or {}))

    sub = await nc.subscribe(inbox, cb=receive)
    try:
        await nc.publish(subject, data, reply=inbox, headers=dict(headers) if headers else None)
        while True:
            msg = await queue.get()
            if not msg.data and msg.headers.get("Status") == "503":
                raise BusError(f"no worker serves {subject}")
            yield msg
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
