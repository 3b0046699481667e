"""Publishing an answer's pieces while it is generated: the token stream of a request.

A streaming handler (an async generator, shared.stage) yields `Partial` pieces. For a
request that asked for them (`stream: true`), they go to `<prefix>.tokens.<request_id>` in
small batches: the first at once, then whatever arrived within `tokens.window` seconds of the
last message, together in the next. Each message says its `generation`: a higher one starts
the answer over (a retry, or a stand-in model). The last says `done`. Published without
waiting for acks: the tokens are a preview; the result is the answer.
"""

import logging
import time

import orjson

from shared.errors import BusError
from shared.stage import Partial
from shared.transport.api import MessageBus

log = logging.getLogger(__name__)

GENERATIONS_PER_ATTEMPT = 1000
"""Generations an attempt may start (restarts by stand-in models) before the next attempt's."""


class TokenStream:
    """The token stream of one attempt at one request."""

    def __init__(
        self, bus: MessageBus, subject: str, request_id: str, attempt: int, window: float
    ) -> None:
        self._bus = bus
        self._subject = subject
        self._request_id = request_id
        self._generation = (attempt - 1) * GENERATIONS_PER_ATTEMPT
        self._window = window
        self._buffer: list[str] = []
        self._seq = 0
        self._last = float("-inf")

    async def add(self, partial: Partial) -> None:
        """Take one piece; send what is held when the window since the last message passed."""
        if partial.restart:
            await self._flush()
            self._generation += 1
        if partial.text:
            self._buffer.append(partial.text)
        if self._buffer and time.monotonic() - self._last >= self._window:
            await self._flush()

    async def close(self) -> None:
        """Send what is held, then the end."""
        await self._flush()
        await self._send({"done": True})

    async def _flush(self) -> None:
        if self._buffer:
            text, self._buffer = "".join(self._buffer), []
            await self._send({"text": text})
            self._last = time.monotonic()

    async def _send(self, fields: dict[str, object]) -> None:
        message = {"request_id": self._request_id, "generation": self._generation,
                   "seq": self._seq, **fields}  # fmt: skip
        self._seq += 1
        try:
            await self._bus.emit(self._subject, orjson.dumps(message))
        except BusError as exc:  # a preview lost; the result still carries the answer
            log.debug("token stream of %s: %s", self._request_id, exc)
