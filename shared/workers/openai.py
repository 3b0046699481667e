"""The `openai` worker: any OpenAI-compatible chat-completions endpoint, streamed.

OpenAI, vLLM, llama.cpp's server, Ollama and LM Studio all speak it: `POST
{base_url}/chat/completions` with `"stream": true` answers with server-sent events, one JSON
chunk per `data:` line, `data: [DONE]` last. httpx does the HTTP.

- The API key comes from an environment variable or a file, read when the worker starts; it
  goes into the Authorization header and nowhere else (not in errors, logs or `repr`).
- Timeouts: `connect_timeout` to connect, `first_token_timeout` until the first token,
  `total_timeout` for the whole answer; each a transient failure.
- Transient failures (429, 5xx, a connection error, a timeout) are retried `retries` times
  with exponential backoff and full jitter, or after the `Retry-After` a 429 or 503 gives;
  once a token has been yielded nothing is retried here (the stage retries the request).
  Then `ModelUnavailable` is raised: the request is retried later, or by a fallback model.
- Any other 4xx is permanent: `ModelRefused` (a `Reject`) with the backend's message, and
  the request is dead-lettered as `failed` at once.
- At most `concurrency` requests are in flight to the backend; `breaker_failures` failed
  requests in a row open a circuit breaker that fails calls at once for `breaker_reset`
  seconds (then one probe goes through).
"""

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field

from shared.envelope import Usage
from shared.errors import ConfigError
from shared.workers.breaker import CircuitBreaker
from shared.workers.errors import ModelRefused, ModelUnavailable


class OpenAIOptions(BaseModel):
    """`[stages.inference.options.openai]`: an OpenAI-compatible endpoint and how to call it."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["openai"] = "openai"
    base_url: str = Field(default="https://api.openai.com/v1", pattern=r"^https?://")
    """Up to and including the version: `http://127.0.0.1:8080/v1` for llama.cpp's server,
    `http://127.0.0.1:11434/v1` for Ollama, `http://127.0.0.1:8000/v1` for vLLM."""
    model: str = Field(min_length=1)
    api_key_env: str | None = "OPENAI_API_KEY"
    """The environment variable holding the API key (unset or empty: no key is sent)."""
    api_key_file: Path | None = None
    """A file holding the API key (beats api_key_env)."""
    system: str | None = None
    """A system message sent before the prompt."""
    max_tokens: int | None = Field(default=256, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: list[str] | None = None
    seed: int | None = None
    extra_body: dict[str, Any] = Field(default_factory=dict)
    """More fields for the request body, as they are (a server's own sampling options)."""
    connect_timeout: float = Field(default=5.0, gt=0)
    first_token_timeout: float = Field(default=60.0, gt=0)
    total_timeout: float = Field(default=300.0, gt=0)
    retries: int = Field(default=3, ge=0)
    """Further tries after a transient failure, before any token arrived."""
    backoff: float = Field(default=0.5, ge=0)
    """The first retry waits up to this many seconds (full jitter), doubling each time."""
    backoff_max: float = Field(default=10.0, ge=0)
    concurrency: int = Field(default=8, ge=1)
    """Requests in flight to the backend at once, per stage instance."""
    breaker_failures: int = Field(default=5, ge=1)
    breaker_reset: float = Field(default=30.0, gt=0)


class _Transient(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OpenAIWorker:
    """Streams chat completions from an OpenAI-compatible endpoint."""

    def __init__(self, options: OpenAIOptions, transport: httpx.AsyncBaseTransport | None = None):
        self.options = options
        key = _api_key(options)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        timeout = httpx.Timeout(options.total_timeout, connect=options.connect_timeout)
        self._client = httpx.AsyncClient(
            base_url=options.base_url.rstrip("/"), headers=headers, timeout=timeout,
            transport=transport,
        )  # fmt: skip
        self._slots = asyncio.Semaphore(options.concurrency)
        self.breaker = CircuitBreaker(options.breaker_failures, options.breaker_reset)

    def __repr__(self) -> str:
        return f"OpenAIWorker({self.options.base_url!r}, model={self.options.model!r})"

    async def aclose(self) -> None:
        """Close the HTTP client and its connections."""
        await self._client.aclose()

    async def stream(self, prompt: str, *, session_id: str) -> AsyncIterator[str | Usage]:
        """Yield the completion's text as it arrives, then its Usage."""
        o = self.options
        for attempt in range(o.retries + 1):
            if not self.breaker.allow():
                raise ModelUnavailable(f"{self!r}: circuit open after repeated failures; "
                                       f"next try in {self.breaker.retry_in():.0f}s")  # fmt: skip
            yielded = False
            try:
                async with self._slots:
                    async for piece in self._once(prompt, session_id):
                        yielded = True
                        yield piece
                self.breaker.succeeded()
                return
            except _Transient as exc:
                self.breaker.failed()
                if yielded or attempt == o.retries:
                    raise ModelUnavailable(f"{self!r}: {exc}") from None
                cap = min(o.backoff_max, o.backoff * 2**attempt)
                wait = exc.retry_after if exc.retry_after is not None else random.uniform(0, cap)
                await asyncio.sleep(min(wait, o.total_timeout))
            except ModelRefused:
                self.breaker.succeeded()  # the backend answered: it is up
                raise

    def _body(self, prompt: str, session_id: str) -> dict[str, Any]:
        o = self.options
        messages = [{"role": "user", "content": prompt}]
        if o.system:
            messages.insert(0, {"role": "system", "content": o.system})
        body: dict[str, Any] = {
            "model": o.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": session_id,
        }
        for key in ("max_tokens", "temperature", "top_p", "stop", "seed"):
            value = getattr(o, key)
            if value is not None:
                body[key] = value
        return {**body, **o.extra_body}

    async def _once(self, prompt: str, session_id: str) -> AsyncIterator[str | Usage]:
        o = self.options
        started = time.monotonic()
        deadline = started + o.total_timeout
        first_by = started + o.first_token_timeout
        usage: Usage | None = None
        model = o.model
        try:
            request = self._client.build_request(
                "POST", "/chat/completions", content=orjson.dumps(self._body(prompt, session_id)),
                headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
            )  # fmt: skip
            response = await _within(self._client.send(request, stream=True), first_by)
        except httpx.HTTPError as exc:
            raise _Transient(f"request failed: {type(exc).__name__}: {exc}") from None
        try:
            if response.status_code != 200:
                await self._refuse(response)
            lines = response.aiter_lines()
            got_token = False
            while True:
                try:
                    line = await _within(anext(lines), first_by if not got_token else deadline)
                except StopAsyncIteration:
                    break
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = _json(data)
                if "error" in chunk:
                    raise _Transient(f"error in stream: {_message(chunk['error'])}")
                model = str(chunk.get("model") or model)
                if chunk.get("usage"):
                    usage = _usage(model, chunk["usage"])
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        got_token = True
                        yield text
        except httpx.HTTPError as exc:
            raise _Transient(f"stream broke: {type(exc).__name__}: {exc}") from None
        finally:
            with contextlib.suppress(Exception):
                await response.aclose()
        yield usage or Usage(model=model)

    async def _refuse(self, response: httpx.Response) -> None:
        """Raise for a non-200 answer: transient for 429 and 5xx, else permanent."""
        with contextlib.suppress(httpx.HTTPError):
            await response.aread()
        status = response.status_code
        message = (
            _message(_json(response.text).get("error") or response.text) or response.reason_phrase
        )
        detail = f"HTTP {status}: {message}"[:500]
        if status == 429 or status >= 500:
            raise _Transient(detail, _retry_after(response.headers.get("Retry-After")))
        raise ModelRefused(f"{self.options.model} refused the request: {detail}")


async def _within(awaitable: Any, deadline: float) -> Any:
    """Await with a deadline (time.monotonic); a timeout is a transient failure."""
    left = deadline - time.monotonic()
    try:
        return await asyncio.wait_for(awaitable, max(left, 0.001))
    except TimeoutError:
        raise _Transient("timed out waiting for the model") from None


def _api_key(options: OpenAIOptions) -> str | None:
    if options.api_key_file is not None:
        try:
            return options.api_key_file.read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise ConfigError(
                f"cannot read the API key file {options.api_key_file}: {exc.strerror}"
            ) from None
    if options.api_key_env:
        return os.environ.get(options.api_key_env) or None
    return None


def _json(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _message(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error).strip()


def _usage(model: str, raw: dict[str, Any]) -> Usage:
    def count(key: str) -> int | None:
        value = raw.get(key)
        return value if type(value) is int else None  # not a bool, which is an int too

    return Usage(model=model, prompt_tokens=count("prompt_tokens"),
                 completion_tokens=count("completion_tokens"))  # fmt: skip


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (seconds, not an HTTP date), capped at 60."""
    if value is None:
        return None
    try:
        return min(60.0, max(0.0, float(value)))
    except ValueError:
        return None
