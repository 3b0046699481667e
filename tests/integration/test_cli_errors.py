"""Bad settings and closed pipes: one line on stderr and a documented exit code, never a
traceback, from the command line and from a stage started on its own."""

import subprocess
import sys

import pytest

from tests.support import ROOT, orchestrator_command, stage_env

BAD_ENVIRONMENT = [
    ({"ORCH_STAGES__RAG__BACKOFF": "1,2"}, "ORCH_STAGES__RAG__BACKOFF: cannot parse '1,2'"),
    ({"ORCH_STAGES": "{bad"}, "ORCH_STAGES: cannot parse '{bad'"),
    ({"ORCH_RESULTS": "[1"}, "ORCH_RESULTS: cannot parse '[1'"),
]


def one_line_error(done: subprocess.CompletedProcess[str], expected: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert expected in lines[0]
    assert "JSON" in lines[0]  # how to write it instead


@pytest.mark.parametrize(("variables", "expected"), BAD_ENVIRONMENT)
def test_a_bad_environment_value_is_one_line_naming_the_variable(nats_server, variables, expected):
    env = stage_env(nats_server.url, **variables)
    done = subprocess.run([*orchestrator_command(), "status"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    one_line_error(done, expected)


def test_a_stage_started_with_a_bad_value_names_it_and_exits_2(nats_server):
    env = stage_env(nats_server.url, ORCH_STAGES__RAG__BACKOFF="1,2")
    done = subprocess.run([sys.executable, "-m", "services.rag"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    one_line_error(done, "ORCH_STAGES__RAG__BACKOFF: cannot parse '1,2'")


def test_a_stage_module_takes_the_options_of_orchestrator_run():
    # No server: a stage that ignored its arguments would start and wait for one instead.
    env = stage_env("nats://127.0.0.1:9")
    module = [sys.executable, "-m", "services.rag"]
    shown = subprocess.run([*module, "--help"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "--nats-url" in shown.stdout and "--config" in shown.stdout
    refused = subprocess.run([*module, "--nats-url", "http://127.0.0.1:4222"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 2 and "argument --nats-url: not a NATS" in refused.stderr
    unknown = subprocess.run([*module, "--bogus"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert unknown.returncode == 2 and "unrecognized arguments: --bogus" in unknown.stderr


BAD_FLAGS = [
    (["ask", "hi", "--session", ""], "argument --session: a session id has 1 to 1024"),
    (["ask", "hi", "--session", "s", "--request-id", "no spaces"], "argument --request-id"),
    (["publish", "hi", "--session", "s", "--meta", "k"], "argument --meta: wants KEY=VALUE"),
    (["result", "a/b"], "argument request_id: a request id has"),
    (["dlq", "ls", "--since", "yesterday"], "argument --since: cannot read time 'yesterday'"),
    (["dlq", "purge", "--until", "7 days"], "argument --until: cannot read time"),
    (["dlq", "replay", "--session", ""], "argument --session"),
    (["--nats-url", "http://localhost:4222", "status"], "argument --nats-url: not a NATS"),
    (["status", "--nats-url", "nats://localhost:99999"], "argument --nats-url"),
    (["up", "--instances", "0"], "argument --instances: must be >= 1, got 0"),
]


@pytest.mark.parametrize(("flags", "expected"), BAD_FLAGS)
def test_a_bad_flag_is_one_line_naming_it_before_anything_connects(flags, expected):
    # No server at all: a flag that was checked only after connecting would fail on that.
    env = stage_env("nats://127.0.0.1:9")
    done = subprocess.run([*orchestrator_command(), *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert expected in line and line.startswith("orchestrator") and "--help" in line, line


def test_a_bad_url_in_the_environment_and_an_empty_server_are_one_line(nats_server):
    env = stage_env(nats_server.url, ORCH_NATS_URL="http://localhost:4222")
    done = subprocess.run([*orchestrator_command(), "status"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "ORCH_NATS_URL: not a NATS server URL: 'http://localhost:4222'" in done.stderr
    for command in (["status"], ["dlq", "ls"]):  # nothing declared on this server yet
        done = subprocess.run([*orchestrator_command(), *command], cwd=ROOT,
                              env=stage_env(nats_server.url), capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert (done.returncode, done.stdout) == (2, ""), done.stderr
        assert done.stderr.count("\n") == 1 and "run `orchestrator declare`" in done.stderr


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["validate"], ["compose"]])
def test_a_closed_pipe_ends_the_command_quietly(nats_server, command):
    env = stage_env(nats_server.url)
    declared = subprocess.run([*orchestrator_command(), "declare"], cwd=ROOT, env=env,
                              capture_output=True, timeout=60)  # fmt: skip
    assert declared.returncode == 0, declared.stderr
    # The reader is gone before the command writes (as with `| head` once it has its lines).
    process = subprocess.Popen([*orchestrator_command(), *command], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    err = process.stderr.read().decode()
    code = process.wait(60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert err == ""
    assert code == 141  # 128 + SIGPIPE, as a shell reports a command ended by a closed pipe


async def test_a_request_over_the_limit_is_refused_before_it_is_published(nats_server):
    from shared.client import Client
    from shared.envelope import Request
    from shared.errors import InvalidMessage, MessageTooLarge
    from shared.runtime.group import declare
    from shared.topology import INTAKE, Topology
    from shared.transport.connection import Bus
    from tests.support import settings_for

    settings = settings_for(stage_env(nats_server.url))
    topology = Topology(settings)
    async with await Bus.connect(nats_server.url, name="t") as bus:
        await declare(bus, topology)
        client = await Client.connect(settings, nats_server.url)
        try:
            with pytest.raises(MessageTooLarge, match="over the pipeline's max_message_bytes"):
                await client.publish("x" * 300_000, "big")
            # A request built in Python is checked when it is published, not when it is built.
            built = Request(request_id="with.dots", session_id="s", input="x", created_at=1.0)
            with pytest.raises(InvalidMessage, match="request_id: expected `str` matching"):
                await client.publish_request(built)
        finally:
            await client.close()
        intake = await bus.admin.stream_state(topology.stream_name(INTAKE))
        assert intake.messages == 0  # nothing was sent, so nothing is dead-lettered later

    # (a smaller limit: one command-line argument may not exceed 128 KiB)
    env = stage_env(nats_server.url, ORCH_MAX_MESSAGE_BYTES="65536")
    command = [*orchestrator_command(), "ask", "x" * 70_000, "--session", "big"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: the request is 70") and done.stderr.count("\n") == 1
    assert "max_message_bytes of 65536" in done.stderr
