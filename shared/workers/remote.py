"""The `remote` worker: a model served by `orchestrator worker serve` processes, over NATS.

The inference stage sends the prompt to `<prefix>.workers.<model>`; the worker services of
that model share the subject in a queue group (the NATS micro protocol: `nats micro ls`
lists them), so they scale apart from the stage. One of them answers with a stream of
messages on the request's inbox (docs/PROTOCOL.md): text as it is generated, a heartbeat
each second while it works, and the usage last, or an error. A worker that falls silent for
`idle_timeout` seconds is taken for dead: before the first token the request is sent again
(another worker of the queue group takes it), after it the stage retries the request.
"""

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

import orjson
from pydantic import BaseModel, ConfigDict, Field

from shared.envelope import Usage, validated
from shared.errors import BusError, InvalidMessage
from shared.transport.api import StoredMessage
from shared.workers.errors import ModelRefused, ModelUnavailable

HEARTBEAT = 1.0
"""Seconds between a worker service's heartbeats while it generates."""


class Requester(Protocol):
    """What the remote worker needs of the bus: a request answered by a stream of replies."""

    def request_stream(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None
    ) -> AsyncIterator[StoredMessage]:
        """Send a request and yield its replies."""
        ...


class RemoteOptions(BaseModel):
    """`[...options.remote]`: which served model, and how long to wait for it."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["remote"] = "remote"
    model: str = Field(default="default", pattern=r"^[A-Za-z0-9_-]+$")
    """The model the worker services serve (`orchestrator worker serve --model NAME`)."""
    first_token_timeout: float = Field(default=60.0, gt=0)
    idle_timeout: float = Field(default=5.0, gt=HEARTBEAT)
    """Silence after which the worker answering is taken for dead."""
    retries: int = Field(default=2, ge=0)
    """Sends again when no worker answers, or one dies before the first token."""


def worker_subject(prefix: str, model: str) -> str:
    """The subject the worker services of `model` share."""
    return f"{prefix}.workers.{model}"


class RemoteWorker:
    """Streams completions from worker services over NATS."""

    def __init__(self, options: RemoteOptions, requester: Requester, prefix: str) -> None:
        self.options = options
        self._requester = requester
        self.subject = worker_subject(prefix, options.model)

    def __repr__(self) -> str:
        return f"RemoteWorker({self.subject!r})"

    async def aclose(self) -> None:
        """Nothing of its own to release (it uses the stage's connection)."""

    async def stream(self, prompt: str, *, session_id: str) -> AsyncIterator[str | Usage]:
        """Yield the completion as a worker service generates it, then its usage."""
        body = orjson.dumps({"prompt": prompt, "session_id": session_id})
        o = self.options
        for attempt in range(o.retries + 1):
            yielded = False
            try:
                async for item in self._once(body):
                    yielded = yielded or isinstance(item, str)
                    yield item
                return
            except ModelUnavailable:
                if yielded or attempt == o.retries:
                    raise

    async def _once(self, body: bytes) -> AsyncIterator[str | Usage]:
        o = self.options
        replies = self._requester.request_stream(self.subject, body)
        wait = o.first_token_timeout
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(anext(replies), wait)
                except TimeoutError:
                    raise ModelUnavailable(f"{self!r}: no word from the worker in {wait:g}s "
                                           "(it died, or is stuck)") from None  # fmt: skip
                except BusError as exc:
                    raise ModelUnavailable(f"{self!r}: {exc}") from None
                reply = _json(msg.data)
                if "error" in reply:
                    if reply.get("permanent"):
                        raise ModelRefused(str(reply["error"]))
                    raise ModelUnavailable(f"{self!r}: {reply['error']}")
                if reply.get("text"):
                    wait = o.idle_timeout
                    yield str(reply["text"])
                elif reply.get("done"):
                    try:
                        usage = validated(reply.get("usage") or {"model": o.model}, Usage)
                    except InvalidMessage as exc:  # the worker's fault, not the request's
                        raise ModelUnavailable(f"{self!r}: malformed usage: {exc}") from None
                    yield usage
                    return
        finally:
            await replies.aclose()  # type: ignore[attr-defined]


def _json(data: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return {"error": f"unreadable reply {data[:80]!r}"}
    return value if isinstance(value, dict) else {"error": f"unexpected reply {value!r}"}
