"""Token streaming on a real nats-server: tokens reach the client before the result, and a
follower that starts late still gets the whole answer."""

import asyncio
import time

import pytest

from shared.client import Chunk
from shared.envelope import Result, new_request_id
from shared.errors import InvalidMessage
from tests.support import in_process_pipeline, orchestrator_command, stage_env

SLOW = {"ORCH_STAGES__INFERENCE__OPTIONS__ECHO__TOKEN_DELAY": "0.01"}


async def test_tokens_reach_the_client_before_the_result(nats_server):
    async with in_process_pipeline(nats_server.url, **SLOW) as (_, _, client, _):
        arrivals: list[tuple[float, object]] = []
        async for item in client.ask_stream("How are tokens streamed?", "s1", timeout=30):
            arrivals.append((time.monotonic(), item))
        *chunks, (result_at, result) = arrivals
        assert isinstance(result, Result)
        assert all(isinstance(c, Chunk) for _, c in chunks)
        assert len(chunks) > 2  # in pieces, batched
        assert chunks[0][0] < result_at - 0.1  # the first token well before the result
        text = "".join(c.text for _, c in chunks)
        assert result.output == text.strip()  # post trims; nothing else differs

        # Following late: the whole answer, from the first token, then the result.
        late = [item async for item in client.follow(result.request_id, timeout=5)]
        assert "".join(c.text for c in late[:-1]) == text
        assert late[-1] == result

        # A request that did not ask for tokens: its answer at once, when its result is there.
        quiet = await client.publish("no tokens for me", "s2")
        items = [item async for item in client.follow(quiet, timeout=30)]
        assert len(items) == 2 and items[0] == Chunk(items[1].output)


async def test_a_follower_is_told_when_the_result_is_unreadable(nats_server):
    async with in_process_pipeline(nats_server.url) as (_, bus, client, _):
        request_id = new_request_id()
        await bus.publish(client.topology.result_subject(request_id), b"not json",
                          msg_id="garbage")  # fmt: skip
        async with asyncio.timeout(20):  # it used to wait here forever
            with pytest.raises(InvalidMessage, match="not valid JSON"):
                async for _ in client.follow(request_id, timeout=5):
                    pass


async def test_ask_stream_prints_tokens_as_they_come(nats_server):
    async with in_process_pipeline(nats_server.url, **SLOW):
        env = stage_env(nats_server.url)
        process = await asyncio.create_subprocess_exec(
            *orchestrator_command(), "ask", "What is streaming?", "--session", "cli",
            "--stream", env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stdout is not None
        first = await asyncio.wait_for(process.stdout.read(8), 20)
        seen_at = time.monotonic()
        rest, err = await process.communicate()
        done_at = time.monotonic()
    assert process.returncode == 0, err.decode()
    assert first.startswith(b"Context:")
    assert done_at - seen_at > 0.1  # the first bytes came while the model was still going
    assert (first + rest).decode().rstrip().endswith("Question: What is streaming?\nAnswer:")
