"""The command line as a user runs it: demo, up, publish, ask, result."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import ROOT, STAGE_NAMES, orchestrator_command, stage_env


def run(args, env, timeout=120):
    return subprocess.run(
        orchestrator_command() + args,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_demo_on_embedded_server_exits_zero():
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_") and k != "NATS_URL"}
    done = run(["demo", "--worker", "echo"], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("  -> Context:") == 10
    assert "per-stage latency" in done.stdout
    for stage in ("rag", "assemble", "inference", "post", "stream"):
        assert f"\n{stage} " in done.stdout
    assert "embedded nats-server on nats://127.0.0.1:" in done.stderr


def test_demo_uses_configured_server(nats_server):
    done = run(
        ["--nats-url", nats_server.url, "demo", "--requests", "3", "--worker", "echo"],
        stage_env("x"),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("  -> Context:") == 3
    assert "embedded" not in done.stderr


def test_demo_whose_model_cannot_start_fails_at_once_with_the_reason(nats_server, tmp_path):
    config = tmp_path / "pipeline.toml"
    missing = tmp_path / "missing.gguf"
    config.write_text(
        f'[stages.inference.options]\nworker = "local"\nlocal = {{ model_path = "{missing}" }}\n',
        encoding="utf-8",
    )
    started = time.monotonic()
    done = run(["--nats-url", nats_server.url, "demo", "--requests", "2"],
               stage_env(nats_server.url, ORCH_CONFIG=str(config)), timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"error: local model file not found: {missing}" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 30  # not after the demo's two-minute wait for a model


def test_up_publish_ask_result_round_trip(nats_server, tmp_path):
    health_file = tmp_path / "alive"
    env = stage_env(nats_server.url, ORCH_HEALTH_FILE=str(health_file))
    declared = run(["declare"], env)
    assert declared.returncode == 0, declared.stderr
    assert "stream ORCH_INTAKE: created" in declared.stdout
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen([*orchestrator_command(), "up"], cwd=ROOT, env=env, stdout=log,
                          stderr=subprocess.STDOUT)  # fmt: skip
    try:
        asked = run(["ask", "What is NATS?", "--session", "cli", "--timeout", "30"], env)
        assert asked.returncode == 0, asked.stderr
        assert asked.stdout.startswith("Context:\n- NATS is a lightweight messaging system")
        assert asked.stdout.rstrip().endswith("Question: What is NATS?\nAnswer:")

        published = run(["publish", "hello", "--session", "s.1", "--meta", "user=u1"], env)
        assert published.returncode == 0, published.stderr
        request_id = published.stdout.strip()
        assert len(request_id) == 32

        result = run(["result", request_id, "--timeout", "30", "--json"], env)
        assert result.returncode == 0, result.stderr
        assert '"metadata": {\n    "user": "u1"\n  }' in result.stdout
        assert '"session_id": "s.1"' in result.stdout

        assert run(["health"], env).returncode == 0

        # The README's Python scripts, run as written.
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        scripts = [
            block
            for block in re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
            if "asyncio.run(" in block
        ]
        outputs = []
        for script in scripts:
            ran = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
            assert ran.returncode == 0, ran.stderr
            outputs.append(ran.stdout)
        client, dlq = outputs  # the client, then the dead-letter operations
        # With $ORCH_CONFIG naming a file that changes a built-in stage, as the stages may run.
        changed = tmp_path / "changed.toml"
        changed.write_text("[stages.post]\nconcurrency = 64\n", encoding="utf-8")
        again = subprocess.run([sys.executable, "-c", scripts[0]], cwd=ROOT, capture_output=True,
                               env={**env, "ORCH_CONFIG": str(changed)}, text=True,
                               timeout=60)  # fmt: skip
        assert again.returncode == 0, again.stderr
        first, second, streamed = client.split("Answer:\n", 2)  # three answers, in order
        assert first.endswith("Question: What is JetStream?\n")
        assert second.endswith("Question: And consumers?\n")
        assert re.search(r"Question: And streams\?\nAnswer:\n\(echo: \d+ tokens\)\n$", streamed)
        assert dlq.splitlines() == ["replayed 0 of 0"]  # nothing was dead-lettered here
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(60)
        log.close()
    assert code == 0, (tmp_path / "up.log").read_text()
    assert "stopped" in (tmp_path / "up.log").read_text()
    stale = run(["health", "--max-age", "0"], env)
    assert stale.returncode == 1
    assert "unhealthy" in stale.stderr


def test_errors_are_clear_and_exit_nonzero(tmp_path):
    env = stage_env("nats://127.0.0.1:1")
    missing = run(["result", "abc"], env, timeout=60)
    assert missing.returncode == 2
    assert "error: cannot reach NATS at nats://127.0.0.1:1" in missing.stderr
    # The error alone: no progress line for a wait this short, none per retry.
    assert missing.stderr.splitlines() == [missing.stderr.strip()], missing.stderr
    assert missing.stderr.startswith("error: cannot reach NATS")
    bad = tmp_path / "bad.toml"
    bad.write_text("partitions = 0\n")
    invalid = run(["--config", str(bad), "declare"], env)
    assert invalid.returncode == 2
    assert "partitions" in invalid.stderr
    assert "Traceback" not in invalid.stderr + missing.stderr


def test_malformed_pipeline_file_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("partitions = \n")
    env = stage_env("nats://127.0.0.1:1")
    cli = run(["--config", str(bad), "status"], env, timeout=60)
    stage = subprocess.run([sys.executable, "-m", "services.rag"], cwd=ROOT,
                           env={**env, "ORCH_CONFIG": str(bad)}, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    for done in (cli, stage):
        assert done.returncode == 2, done.stderr
        assert done.stderr.splitlines() == [
            f"error: pipeline file {bad} is not valid TOML: Invalid value (at line 1, column 14)"
        ]


def test_help_explains_every_command(capsys):
    from shared.app.cli import main

    done = run(["--help"], dict(os.environ))
    assert done.returncode == 0
    commands = ("demo", "up", "run", "declare", "server", "publish", "ask", "result", "health")
    for command in commands:
        assert command in done.stdout
    assert run(["run", "--help"], dict(os.environ)).returncode == 0
    dlq = [["status"], ["dlq"], *(["dlq", op] for op in ("ls", "show", "replay", "purge"))]
    for command in [[c] for c in commands] + dlq:  # each says what it does, not its options
        with pytest.raises(SystemExit) as exited:
            main([*command, "--help"])
        assert exited.value.code == 0
        text = capsys.readouterr().out
        description = text.split("\n\n")[1]
        assert not description.startswith(("positional arguments", "options")), text
        assert len(description.split()) >= 20, text


@pytest.mark.parametrize(
    "args",
    [
        ["publish", "x", "--session", "s", "--ttl", "0"],
        ["publish", "x", "--session", "s", "--ttl", "-5"],
        ["ask", "x", "--session", "s", "--timeout", "-1"],
        ["ask", "x", "--session", "s", "--timeout", "0"],
        ["ask", "x", "--session", "s", "--ttl", "nan"],
        ["result", "abc", "--timeout", "-1"],
        ["demo", "--requests", "0"],
        ["up", "--instances", "0"],
        ["health", "--max-age", "-1"],
        ["server", "--port", "0"],
    ],
)
def test_non_positive_numbers_are_rejected_by_argparse(args, capsys):
    from shared.app.cli import main

    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    assert f"argument {args[-2]}: must be" in capsys.readouterr().err


def test_no_result_exits_1_with_or_without_waiting(nats_server):
    env = stage_env(nats_server.url)
    assert run(["declare"], env).returncode == 0
    now = run(["result", "no-such-request"], env)
    waited = run(["result", "no-such-request", "--timeout", "0.5"], env)
    for done in (now, waited):
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("no result for request no-such-request"), done.stderr
    asked = run(["ask", "hi", "--session", "s", "--request-id", "r1", "--timeout", "0.5"], env)
    assert asked.returncode == 1, asked.stderr
    assert "`orchestrator result r1` reads its result later" in asked.stderr


def test_up_with_instances_runs_separate_processes_and_status_shows_owners(nats_server, tmp_path):
    env = stage_env(nats_server.url)
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen([*orchestrator_command(), "up", "--instances", "2"], cwd=ROOT, env=env,
                          stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:  # until every stage has two instances sharing the 8 partitions evenly
            status = run(["status", "--json"], env)
            if status.returncode == 0:
                stages = json.loads(status.stdout)["stages"]
                owned = [sorted(len(ps) for ps in s["instances"].values()) for s in stages]
                if owned == [[4, 4]] * 5:
                    break
            assert time.monotonic() < deadline, status.stdout + status.stderr
            time.sleep(0.5)
        # Ten processes, each named for its slot under this supervisor: a restarted one keeps
        # its name (and takes its partitions back at once).
        names = {i for s in stages for i in s["instances"]}
        assert {name.rsplit("-", 2)[1:][0] for name in names} == {str(up.pid)}
        assert sorted(name.split("-")[0] + name[-2:] for name in names) == sorted(
            f"{stage}-{slot}" for stage in STAGE_NAMES for slot in (0, 1)
        )
        asked = run(["ask", "What is NATS?", "--session", "s", "--timeout", "30"], env)
        assert asked.returncode == 0, asked.stderr
        text = run(["status"], env).stdout
        assert "instances and the partitions they own:" in text
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(90)
        log.close()
    assert code == 0, (tmp_path / "up.log").read_text()


def test_server_command_stops_its_nats_server_on_sigterm_and_removes_its_store(tmp_path):
    from shared.app.natsserver import free_port

    port = free_port()
    server = subprocess.Popen(
        [*orchestrator_command(), "server", "--port", str(port)],
        cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp_path)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert server.stdout is not None
    first = server.stdout.readline()
    assert f"nats-server on nats://127.0.0.1:{port} (pid " in first
    child = int(first.split("(pid ")[1].split(")")[0])
    store = Path(first.split("store ")[1].split(" (temporary")[0])
    assert store.parent == tmp_path and store.is_dir()
    server.send_signal(signal.SIGTERM)
    server.wait(30)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{child}"), "nats-server outlived the command"
    assert not store.exists(), "the temporary store outlived the command"


def test_server_command_refuses_a_store_another_server_uses(nats_binary):
    from shared.app.natsserver import free_port

    store = nats_binary.store_dir
    second = run(["server", "--port", str(free_port()), "--store", str(store)], dict(os.environ))
    assert second.returncode == 2
    assert second.stderr.splitlines() == [
        f"error: store {store} is in use by another nats-server (pid {nats_binary.pid}): "
        "give each server its own store"
    ]
    assert (store / "jetstream").is_dir()  # a store it did not create is never removed


def test_second_up_gets_a_store_of_its_own(tmp_path):
    import socket

    from shared.app.natsserver import port_is_free

    env = stage_env("x", XDG_CACHE_HOME=str(tmp_path / "cache"), TMPDIR=str(tmp_path / "tmp"))
    del env["ORCH_NATS_URL"]
    (tmp_path / "tmp").mkdir()
    with socket.socket() as holder:  # as a first `up` would, unless something already does
        if port_is_free(4222):
            holder.bind(("127.0.0.1", 4222))
            holder.listen()
        up = subprocess.Popen([*orchestrator_command(), "up"], cwd=ROOT, env=env,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert up.stderr is not None
        lines = []
        try:
            while not (lines and " running " in lines[-1]):
                line = up.stderr.readline()
                assert line, "".join(lines)
                lines.append(line)
        finally:
            up.send_signal(signal.SIGTERM)
            code = up.wait(60)
    first = next(line for line in lines if line.startswith("embedded nats-server on"))
    store = Path(first.rsplit("store ", 1)[1].strip())
    assert store.parent == tmp_path / "tmp", first
    assert any(line.startswith("(port 4222 is taken: pass --nats-url") for line in lines)
    assert code == 0, up.stderr.read()
    assert not store.exists()
    assert not (tmp_path / "cache").exists()  # the default port's store was left alone


def _servers_using(store: Path) -> list[int]:
    """Pids of live nats-server processes whose command line names this store."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if (
            state != "Z"
            and any(b"nats-server" in arg for arg in cmdline[:1])
            and any(str(store).encode() in arg for arg in cmdline)
        ):
            found.append(int(entry.name))
    return found


def test_server_command_interrupted_while_starting_leaves_no_server(tmp_path):
    from shared.app.natsserver import free_port

    server = subprocess.Popen(
        [*orchestrator_command(), "server", "--port", str(free_port()), "--store", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not (children := _servers_using(tmp_path)):  # signal as soon as the server exists
        assert time.monotonic() < deadline and server.poll() is None, "no nats-server started"
        time.sleep(0.005)
    server.send_signal(signal.SIGTERM)
    assert server.wait(30) != 0
    deadline = time.monotonic() + 10
    while _servers_using(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _servers_using(tmp_path) == [], f"nats-server {children} outlived the command"


def test_global_options_go_before_or_after_the_command():
    from shared.app.cli import _parser

    parse = _parser().parse_args
    assert parse(["--nats-url", "nats://a:1", "demo"]).nats_url == "nats://a:1"
    assert parse(["demo", "--nats-url", "nats://b:2"]).nats_url == "nats://b:2"
    assert parse(
        ["--nats-url", "nats://a:1", "dlq", "ls", "--nats-url", "nats://b:2"]
    ).nats_url == ("nats://b:2")
    after = parse(["status", "--config", "p.toml", "-v"])
    assert (str(after.config), after.verbose) == ("p.toml", True)
    assert parse(["health"]).nats_url is None
