"""A real model, Gemma 3 270M from PyPI, served by llama.cpp (xllamacpp) on loopback, through
the whole pipeline: streamed tokens reach the client before the result, and the demo answers
with it by default."""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from shared.client import Chunk
from shared.envelope import Result
from shared.workers.local import default_cache, packaged_model
from tests.support import ROOT, in_process_pipeline, orchestrator_command, stage_env

ALIAS = "gemma3-270m"


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    """llama.cpp's OpenAI-compatible server with the packaged model: its base URL."""
    path = packaged_model(default_cache())  # joined once, then only checked
    with contextlib.closing(__import__("socket").socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "shared.workers.llamacpp_server", "--model", str(path),
         "--port", str(port), "--alias", ALIAS],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, "the llama.cpp server exited"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the model did not load in 120 s"
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


async def test_a_real_model_streams_through_the_pipeline(nats_server, llama_server):
    model = {
        "ORCH_STAGES__INFERENCE__OPTIONS__WORKER": "openai",
        "ORCH_STAGES__INFERENCE__OPTIONS__OPENAI__BASE_URL": llama_server,
        "ORCH_STAGES__INFERENCE__OPTIONS__OPENAI__MODEL": ALIAS,
        "ORCH_STAGES__INFERENCE__OPTIONS__OPENAI__MAX_TOKENS": "48",
        "ORCH_STAGES__INFERENCE__OPTIONS__OPENAI__TEMPERATURE": "0",
    }
    async with in_process_pipeline(nats_server.url, **model) as (_, _, client, _):
        arrivals: list[tuple[float, object]] = []
        async for item in client.ask_stream("Write three short lines about the sea.", "sea",
                                            timeout=120):  # fmt: skip
            arrivals.append((time.monotonic(), item))
        *chunks, (result_at, result) = arrivals
        assert isinstance(result, Result)
        assert len(chunks) >= 2 and all(isinstance(c, Chunk) for _, c in chunks)
        assert chunks[0][0] < result_at  # the first tokens came before the result
        text = "".join(c.text for _, c in chunks)
        assert result.output and result.output in text
        usage = result.usage
        assert usage is not None
        assert (usage.pool, usage.fallback) == ("default", False)
        assert usage.model and usage.completion_tokens and 0 < usage.completion_tokens <= 48
        assert usage.prompt_tokens and usage.ttft_ms is not None and usage.ttft_ms > 0
        # Two at once, on the server's two slots: both answered.
        both = await asyncio.gather(
            client.ask("Name a color.", "a", timeout=120),
            client.ask("Name a fish.", "b", timeout=120),
        )
        assert all(r.output and r.usage and r.usage.completion_tokens for r in both)


def test_the_demo_answers_with_the_local_model_by_default():
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_") and k != "NATS_URL"}
    done = subprocess.run([*orchestrator_command(), "demo", "--requests", "3"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("\n  -> ") == 3, done.stdout
    assert done.stdout.count(f", {ALIAS}: ") == 3  # each answer says the model gave it
    assert "per-stage latency" in done.stdout


def test_the_demo_says_how_to_get_the_local_model_when_it_is_missing(tmp_path):
    # A Python without xllamacpp: the demo's error says what to install, or to use echo.
    env = {**stage_env("nats://127.0.0.1:1"), "PYTHONPATH": str(tmp_path)}
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import importlib.util, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n == 'xllamacpp' else real(n, *a)\n"
    )
    done = subprocess.run([*orchestrator_command(), "demo"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "needs the `local` extra" in done.stderr and "--worker echo" in done.stderr
