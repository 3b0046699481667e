"""The Python client: publish requests into the pipeline and read their results.

Any NATS client can do the same by following docs/PROTOCOL.md; this is the reference.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from opentelemetry import propagate, trace

from shared.cancel import cancel_and_wait
from shared.envelope import (
    DeadLettered,
    MetaValue,
    Request,
    Result,
    decode_answer,
    encode,
    new_request,
    validated,
)
from shared.errors import (
    BusError,
    MessageTooLarge,
    NoSuchStream,
    RequestDeadLettered,
    ResultTimeout,
)
from shared.settings import Settings
from shared.telemetry import tracing_on
from shared.topology import RESULTS, Topology
from shared.transport.api import MessageBus
from shared.transport.connection import Bus
from shared.urls import DEFAULT_URL

log = logging.getLogger(__name__)

_RESULT_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Chunk:
    """A piece of an answer as it is generated."""

    text: str
    restart: bool = False
    """The text before this is void: the answer starts over (a retry, or a stand-in model)."""


_RECHECK = 2.0  # seconds between looks at the results stream while waiting (covers reconnects)


_tracer = trace.get_tracer("prompt-orchestrator")


def _trace_context(request_id: str, subject: str) -> dict[str, str]:
    """W3C trace headers for a request: the caller's active trace if there is one; else, with
    an OpenTelemetry SDK installed, a new trace whose root span is this publish."""
    headers: dict[str, str] = {}
    if trace.get_current_span().get_span_context().is_valid or not tracing_on():
        propagate.inject(headers)
        return headers
    attributes = {"messaging.system": "nats", "messaging.operation.type": "send",
                  "messaging.destination.name": subject,
                  "orchestrator.request_id": request_id}  # fmt: skip
    with _tracer.start_as_current_span("orchestrator publish", kind=trace.SpanKind.PRODUCER,
                                       attributes=attributes):  # fmt: skip
        propagate.inject(headers)
    return headers


class Client:
    """A connection to the pipeline's intake and results."""

    def __init__(self, bus: MessageBus, settings: Settings) -> None:
        self.bus = bus
        self.settings = settings
        self.topology = Topology(settings)

    @classmethod
    async def connect(cls, settings: Settings, url: str | None = None) -> "Client":
        """Connect to the NATS server at `url` (default: `settings.nats_url`, else
        DEFAULT_URL, nats://127.0.0.1:4222)."""
        url = url or settings.nats_url or DEFAULT_URL
        bus = await Bus.connect(
            url, name="orchestrator-client", publish_timeout=settings.publish_timeout, wait=5.0
        )
        return cls(bus, settings)

    async def close(self) -> None:
        """Close the connection."""
        await self.bus.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def publish(
        self,
        text: str,
        session_id: str,
        *,
        metadata: dict[str, MetaValue] | None = None,
        request_id: str | None = None,
        deadline: float | None = None,
        stream: bool = False,
    ) -> str:
        """Submit a request and return its id once the intake stream has stored it.

        Raises Overloaded when the intake is full and InvalidMessage for a malformed request.
        Publishing the same `request_id` again within the duplicate window is a no-op. With
        `stream`, the answer's tokens are published as they are generated (`follow`).
        """
        envelope = new_request(text, session_id, metadata=metadata, request_id=request_id,
                               deadline=deadline, stream=stream)  # fmt: skip
        return await self.publish_request(envelope)

    async def publish_request(self, envelope: Request, wait: float | None = None) -> str:
        """Submit a prepared request; return its request id.

        While the intake stream does not exist yet (the stages are still starting), keep
        trying for up to `wait` seconds (default: `publish_timeout`), then raise NoSuchStream.
        Raises InvalidMessage, and sends nothing, when a field breaks the protocol (a request
        built in Python is checked here, not when it is built).
        """
        await self._submit(validated(envelope, Request), wait)
        return envelope.request_id

    async def _submit(self, envelope: Request, wait: float | None) -> bool:
        """Publish `envelope` (as `publish_request`); False if its id was published before,
        within the duplicate window."""
        subject = self.topology.intake_subject(envelope.session_id)
        data = encode(envelope)
        limit = self.topology.settings.max_message_bytes
        if len(data) > limit:  # the first stage would dead-letter it as invalid
            raise MessageTooLarge(
                f"the request is {len(data)} bytes encoded, over the pipeline's "
                f"max_message_bytes of {limit}; nothing was sent"
            )
        trace_headers = _trace_context(envelope.request_id, subject)
        give_up = time.monotonic() + (self.settings.publish_timeout if wait is None else wait)
        pause = 0.1
        while True:
            try:
                return await self.bus.publish_once(
                    subject, data, msg_id=f"{envelope.request_id}:client",
                    headers=trace_headers or None,
                )  # fmt: skip
            except NoSuchStream as exc:
                if time.monotonic() + pause > give_up:
                    raise NoSuchStream(f"{exc}, or start the pipeline's stages, which declare "
                                       "it") from None  # fmt: skip
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def ask(
        self,
        text: str,
        session_id: str,
        *,
        timeout: float = 30.0,
        metadata: dict[str, MetaValue] | None = None,
        request_id: str | None = None,
        deadline: float | None = None,
    ) -> Result:
        """Submit a request and wait up to `timeout` seconds for its result (RequestDeadLettered
        if it was dead-lettered instead, ResultTimeout if nothing came in time)."""
        envelope = new_request(
            text, session_id, metadata=metadata, request_id=request_id, deadline=deadline
        )
        return await self._await_result(envelope.request_id, timeout, envelope)

    async def ask_stream(
        self,
        text: str,
        session_id: str,
        *,
        timeout: float = 30.0,
        metadata: dict[str, MetaValue] | None = None,
        request_id: str | None = None,
        deadline: float | None = None,
    ) -> AsyncIterator[Chunk | Result]:
        """Submit a request that asks for its tokens, and follow it: the answer's pieces as
        they are generated, then the result (see `follow`)."""
        envelope = new_request(text, session_id, metadata=metadata, request_id=request_id,
                               deadline=deadline, stream=True)  # fmt: skip
        await self.publish_request(envelope, wait=timeout)
        async for item in self.follow(envelope.request_id, timeout=timeout):
            yield item

    async def follow(self, request_id: str, timeout: float = 30.0) -> AsyncIterator[Chunk | Result]:
        """The answer of `request_id` as it is generated, from its first token however late
        this starts, then its result; ResultTimeout when no result came within `timeout`,
        RequestDeadLettered when the request was dead-lettered. The tokens are the streaming
        stage's output: stages after it change only the result.

        A Chunk with `restart` set means the text before it is void (the answer starts
        over). A request that did not ask for its tokens, whose tokens have expired, or whose
        result is stored before its tokens are read, gives its whole answer as one Chunk.
        """
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        async def tokens() -> None:
            try:
                async for msg in self.bus.watch(self.topology.token_subject(request_id)):
                    await events.put(("token", orjson.loads(msg.data)))
            except (BusError, orjson.JSONDecodeError) as exc:  # the result still comes
                log.debug("the tokens of %s cannot be followed: %s", request_id, exc)

        async def result() -> None:
            # Whatever ends the wait is handed over: the loop below waits for nothing else.
            try:
                await events.put(("result", await self.result(request_id, timeout)))
            except Exception as exc:
                await events.put(("error", exc))

        tasks = [asyncio.create_task(tokens()), asyncio.create_task(result())]
        try:
            generation, told, done = -1, False, False
            while True:
                kind, item = await events.get()
                if kind == "error":
                    raise item
                if kind == "result":
                    if not told:
                        yield Chunk(item.output)
                    yield item
                    return
                if done or item.get("generation", 0) < generation:
                    continue
                if item["generation"] > generation:
                    if told:
                        yield Chunk("", restart=True)
                    generation = item["generation"]
                if item.get("done"):
                    done = True
                elif item.get("text"):
                    told = True
                    yield Chunk(item["text"])
        finally:
            await cancel_and_wait(tasks)

    async def result(self, request_id: str, timeout: float = 30.0) -> Result:
        """The result of `request_id`: at once if stored, else when it arrives.

        RequestDeadLettered when the request ended in the dead-letter stream instead (at once,
        with the stage, reason, error and entry); ResultTimeout when nothing came in time.
        """
        return await self._await_result(request_id, timeout, None)

    async def stored_result(self, request_id: str) -> Result | None:
        """The stored result of `request_id`, or None if there is none (yet);
        RequestDeadLettered if it ended in the dead-letter stream."""
        stored = await self.bus.admin.last_message(
            self.topology.stream_name(RESULTS), self.topology.result_subject(request_id)
        )
        return _answer(stored.data) if stored else None

    async def results(self) -> AsyncIterator[Result]:
        """Every stored result from the oldest, then new ones as they are stored (the
        outcomes of dead-lettered requests, stored beside them, are left out)."""
        async for msg in self.bus.watch(self.topology.result_subject("*")):
            answer = decode_answer(msg.data, _RESULT_MAX_BYTES)
            if isinstance(answer, Result):
                yield answer

    async def _look(self, request_id: str) -> Result | None:
        """The stored result, or None while there is none or the broker cannot say (an
        election on a cluster): the wait goes on and looks again."""
        try:
            return await self.stored_result(request_id)
        except BusError as exc:
            log.debug("cannot look for the result of %s yet: %s", request_id, exc)
            return None

    async def _await_result(
        self, request_id: str, timeout: float, to_publish: Request | None
    ) -> Result:
        # Subscribe before publishing (or before looking), so the result cannot slip between.
        sub = await self.bus.subscribe(self.topology.result_subject(request_id))
        try:
            # A request published before (a retry of the same id) may have its answer already.
            if to_publish is None or not await self._submit(to_publish, timeout):
                found = await self._look(request_id)
                if found:
                    return found
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                msg = await sub.next_message(min(left, _RECHECK))
                if msg is not None:
                    return _answer(msg.data)
                found = await self._look(request_id)
                if found:
                    return found
            raise ResultTimeout(request_id, timeout)
        finally:
            await sub.close()


def _answer(data: bytes) -> Result:
    """The result in a message of a result subject; RequestDeadLettered for an outcome."""
    answer = decode_answer(data, _RESULT_MAX_BYTES)
    if isinstance(answer, DeadLettered):
        raise RequestDeadLettered(answer.request_id, answer.status, answer.stage, answer.error,
                                  answer.dead_letter_seq)  # fmt: skip
    return answer
