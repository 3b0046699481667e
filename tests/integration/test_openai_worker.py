"""The openai worker against a scripted OpenAI-compatible server on loopback: streaming,
retries with backoff and Retry-After, timeouts, the circuit breaker, permanent refusals, and
the API key kept out of everything but the Authorization header."""

import asyncio
import json
import time

import msgspec
import pytest

from shared.envelope import Usage, validated
from shared.workers import ModelRefused, ModelUnavailable, OpenAIOptions, OpenAIWorker
from tests.fakemodel import Answer, FakeModelServer

KEY = "sk-test-secret-0123456789"


@pytest.fixture
def server():
    with FakeModelServer() as fake:
        yield fake


def worker(server: FakeModelServer, **options: object) -> OpenAIWorker:
    defaults: dict[str, object] = {"base_url": server.url, "model": "fake", "backoff": 0.01}
    return OpenAIWorker(OpenAIOptions(**(defaults | options)))


async def answer(w: OpenAIWorker, prompt: str = "hi") -> tuple[str, Usage | None]:
    text, usage = "", None
    try:
        async for item in w.stream(prompt, session_id="s1"):
            if isinstance(item, Usage):
                usage = item
            else:
                text += item
    finally:
        await w.aclose()
    return text, usage


async def test_streams_tokens_and_usage_with_the_configured_request(server, monkeypatch):
    monkeypatch.setenv("MY_KEY", KEY)
    server.script = [Answer(tokens=["Line one\n", "```py\n", "x = 1\n", "```"])]
    w = worker(server, api_key_env="MY_KEY", max_tokens=32, temperature=0.0, stop=["END"],
               system="Be brief.", extra_body={"top_k": 5})  # fmt: skip
    text, usage = await answer(w, "What is NATS?")
    assert text == "Line one\n```py\nx = 1\n```"
    assert usage == Usage(model="fake-model", prompt_tokens=7, completion_tokens=4)
    [request] = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    body = request["body"]
    assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "What is NATS?"}]  # fmt: skip
    assert (body["model"], body["stream"], body["max_tokens"]) == ("fake", True, 32)
    assert (body["temperature"], body["stop"], body["top_k"], body["user"]) == (
        0.0, ["END"], 5, "s1")  # fmt: skip
    assert body["stream_options"] == {"include_usage": True}
    assert KEY not in repr(w) and KEY not in repr(w.options)


async def test_a_usage_count_that_is_not_an_integer_is_left_out(server):
    # A bool is an int to Python, not a count: the usage read later would be refused.
    server.script = [Answer(tokens=["a"], usage={"prompt_tokens": True, "completion_tokens": "2"})]
    _, usage = await answer(worker(server))
    assert usage == Usage(model="fake-model")
    assert validated(msgspec.to_builtins(usage), Usage) == usage


async def test_the_api_key_can_come_from_a_file(server, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    await answer(worker(server, api_key_file=str(key_file), api_key_env=None))
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"


async def test_429_is_retried_after_its_retry_after(server):
    server.script = [Answer(status=429, body='{"error": {"message": "slow down"}}',
                            headers={"Retry-After": "0.3"})]  # fmt: skip
    started = time.monotonic()
    text, _ = await answer(worker(server))
    assert text == "Hello world"
    assert len(server.requests) == 2
    assert time.monotonic() - started >= 0.3


async def test_5xx_and_connection_errors_are_retried_with_backoff_then_give_up(server):
    server.script = [Answer(status=500, body="boom"), Answer(status=503, body="busy")]
    text, _ = await answer(worker(server))
    assert (text, len(server.requests)) == ("Hello world", 3)
    server.script = [Answer(status=502, body="bad gateway")] * 3
    with pytest.raises(ModelUnavailable, match="HTTP 502: bad gateway"):
        await answer(worker(server, retries=2))
    with pytest.raises(ModelUnavailable, match="request failed: ConnectError"):
        await answer(worker(server, base_url="http://127.0.0.1:9/v1", retries=1))


async def test_a_4xx_is_permanent_with_the_backends_message_and_not_retried(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    message = "This model's maximum context length is 2048 tokens"
    server.script = [Answer(status=400, body=json.dumps({"error": {"message": message}}))]
    with pytest.raises(ModelRefused) as refused:
        await answer(worker(server))
    assert message in str(refused.value) and "HTTP 400" in str(refused.value)
    assert KEY not in str(refused.value)
    assert len(server.requests) == 1


async def test_first_token_and_total_timeouts(server):
    server.script = [Answer(first_delay=1.0)] * 2
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match="timed out"):
        await answer(worker(server, first_token_timeout=0.2, retries=1))
    assert time.monotonic() - started < 0.9  # two attempts of 0.2 s, not the server's 1 s
    server.script = [Answer(hang=True)]
    with pytest.raises(ModelUnavailable, match="timed out"):
        await answer(worker(server, first_token_timeout=0.2, retries=0))
    # Tokens arrive, but too slowly for the whole answer: once a token was given out,
    # nothing is retried here.
    server.script = [Answer(tokens=["a"] * 20, token_delay=0.05)]
    with pytest.raises(ModelUnavailable, match="timed out"):
        await answer(worker(server, total_timeout=0.3, retries=3))
    assert len(server.requests) == 4  # 2 + 1 + 1: no retry once a token was given out


async def test_the_breaker_fails_fast_while_the_backend_is_down_then_probes(server):
    w = worker(server, retries=0, breaker_failures=2, breaker_reset=0.3)
    server.script = [Answer(status=500, body="down")] * 2
    for _ in range(2):
        with pytest.raises(ModelUnavailable, match="HTTP 500"):
            async for _ in w.stream("x", session_id="s"):
                pass
    with pytest.raises(ModelUnavailable, match="circuit open"):
        async for _ in w.stream("x", session_id="s"):
            pass
    assert len(server.requests) == 2  # failed fast: nothing was sent
    await asyncio.sleep(0.35)
    text, _ = await answer(w)  # the probe succeeds and closes the breaker
    assert text == "Hello world"
    assert w.breaker.state == "closed"


async def test_through_the_pipeline_a_refusal_is_dead_lettered_at_once(server, monkeypatch):
    # The whole pipeline on the in-memory bus, its inference stage on the scripted server.
    from shared.app.load import load
    from shared.client import Client
    from shared.dlq import DeadLetterQueue
    from shared.runtime import loop
    from shared.runtime.group import StageGroup, declare
    from shared.topology import Topology
    from shared.transport.memory import MemoryBus

    monkeypatch.setattr(loop, "FETCH_WAIT", 0.02)
    openai = {"base_url": server.url, "model": "fake", "backoff": 0.01}
    settings = load(partitions=1, stages={
        "inference": {"options": {"worker": "openai", "openai": openai}, "backoff": [0.01]},
    })  # fmt: skip
    server.script = [
        Answer(tokens=["fine ", "answer\n\n", "  with lines"]),
        Answer(status=400, body=json.dumps({"error": {"message": "prompt is too long"}})),
    ]
    topology = Topology(settings)
    async with MemoryBus() as bus:
        await declare(bus, topology)
        group = StageGroup(settings, topology.graph.names, topology)
        group.start(bus)
        client = Client(bus, settings)
        try:
            ok = await client.ask("first", "s", timeout=5)
            refused = await client.publish("second", "s")
            dlq = DeadLetterQueue(bus, topology)
            async with asyncio.timeout(5):
                while not (entries := [e async for e in dlq.entries()]):
                    await asyncio.sleep(0.01)
        finally:
            await group.stop()
    assert ok.output == "fine answer\n\n  with lines"
    assert ok.usage is not None
    assert (ok.usage.model, ok.usage.prompt_tokens, ok.usage.completion_tokens) == (
        "fake-model", 7, 3)  # fmt: skip
    assert ok.usage.ttft_ms is not None and ok.usage.ttft_ms >= 0
    [entry] = entries
    assert (entry.request_id, entry.stage, entry.reason, entry.delivered) == (
        refused, "inference", "failed", 1)  # fmt: skip
    assert "prompt is too long" in entry.error and entry.error.startswith("ModelRefused")
    assert len(server.requests) == 2  # the refused one was sent once, not retried


async def test_a_request_for_a_failing_model_is_answered_by_its_fallback(server):
    from services.inference.stage import Options, complete
    from shared.data import COMPLETION, PROMPT, USAGE
    from shared.envelope import Envelope

    async def answer_of(router, request, prompt):
        done = await complete(router, PROMPT.write(request, prompt))
        return COMPLETION.read(done), USAGE.read(done)

    options = Options.model_validate({
        "worker": "echo",
        "models": {
            "big": {"worker": "openai", "fallback": ["default"],
                    "openai": {"base_url": server.url, "model": "big", "retries": 0}},
            "small": {"worker": "openai",
                      "openai": {"base_url": server.url, "model": "small", "retries": 0}},
        },
        "routes": [{"when": {"metadata": {"tier": "gold"}}, "model": "small"}],
    })  # fmt: skip
    router = options.router()

    def request(**metadata: object) -> Envelope:
        return Envelope(request_id="r", session_id="s", input="x", created_at=0.0,
                        metadata=metadata)  # fmt: skip

    try:
        server.script = [Answer(status=500, body="down")]
        text, usage = await answer_of(router, request(model="big"), "echo this back")
        assert text == "echo this back"  # the echo model stood in
        assert (usage.pool, usage.model, usage.fallback) == ("default", "echo", True)
        assert server.requests[-1]["body"]["model"] == "big"  # big was asked first

        text, usage = await answer_of(router, request(tier="gold"), "q")
        assert (text, usage.pool, usage.fallback) == ("Hello world", "small", False)
        text, usage = await answer_of(router, request(), "plain")
        assert (text, usage.pool, usage.model) == ("plain", "default", "echo")

        server.script = [Answer(status=500, body="down")]  # small has no fallback
        with pytest.raises(ModelUnavailable, match="no model could answer: small: "):
            await answer_of(router, request(model="small"), "q")
        with pytest.raises(ModelRefused.__mro__[1], match="names no model"):  # a Reject
            await answer_of(router, request(model="huge"), "q")
    finally:
        await router.aclose()
