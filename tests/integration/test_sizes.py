"""No accepted request dies for its size: what the intake accepts reaches its result, and a
pipeline whose intake limit the server could not carry through refuses to start."""

import subprocess
import sys

import orjson

from shared.envelope import encode, new_request
from shared.status import read_status
from shared.topology import Topology
from tests.support import ROOT, in_process_pipeline, stage_env, wait_quiet

LIMIT = 256 * 1024  # the default max_message_bytes


def text_of_encoded_size(size: int, unit: str) -> str:
    """An input whose request encodes to just under `size` bytes."""
    overhead = len(encode(new_request("", "big")))
    per_unit = len(orjson.dumps(unit)) - 2
    return unit * ((size - overhead - 64) // per_unit)


async def test_requests_up_to_the_intake_limit_complete(nats_server):
    inputs = [
        "x" * 200_000,  # 200 KB
        text_of_encoded_size(LIMIT, "a line of text\n"),  # escapes grow when re-encoded
        text_of_encoded_size(LIMIT, "naïve café ☕ "),  # several bytes a character
    ]
    async with in_process_pipeline(nats_server.url) as (settings, bus, client, _):
        assert settings.max_message_bytes == LIMIT
        for text in inputs:
            assert len(encode(new_request(text, "big"))) <= LIMIT
            result = await client.ask(text, "big", timeout=60)
            assert text.strip() in result.output  # the echo worker answers with the prompt
            assert result.usage is not None and result.usage.model == "echo"
        status = await wait_quiet(nats_server.url, settings)
        assert (status.accounts.completed, status.accounts.dead_lettered) == (3, 0)
        assert (await read_status(bus, Topology(settings))).accounts.balanced


def test_a_stage_refuses_an_intake_limit_the_server_cannot_carry(nats_server):
    env = stage_env(nats_server.url, ORCH_MAX_MESSAGE_BYTES=str(512 * 1024))
    done = subprocess.run([sys.executable, "-m", "services.rag"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: max_message_bytes is 524288, over a third of the server's "
                           "max_payload (1048576)")  # fmt: skip
    assert "at most 349525" in last
