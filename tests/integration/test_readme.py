"""The README's command-line walkthroughs run as written.

Every `sh` block of the README is taken from the file and its commands are run from the
repository's root, in a shell with the project's virtualenv on PATH. What differs from a
user's terminal, and only this: the NATS server is the test's own (where a block names
127.0.0.1:4222, a free port); a command that runs until Ctrl-C (`up`, `server`, or a line
ending in `&`) starts in the background, as in a terminal of its own, and gets SIGTERM at the
end; files a block writes or names as the reader's own go to a temporary directory. The
README's Python scripts are run by test_cli.py; every other Python block is quoted from the
sources (test_docs.py).
"""

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.client import Client
from tests.support import ROOT, settings_for, stage_env

README = ROOT / "README.md"
LONG_RUNNING = re.compile(r"^orchestrator (--config \S+ )?(up|server)\b")


def sh_blocks() -> list[list[str]]:
    """The README's `sh` blocks, as lists of commands (comments and blank lines dropped)."""
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL)
    return [
        [line for raw in block.splitlines() if (line := re.sub(r"\s+#.*$", "", raw).strip())]
        for block in blocks
    ]


def block_with(command: str) -> list[str]:
    """The one block that has `command` among its commands."""
    [found] = [block for block in sh_blocks() if command in block]
    return found


NOT_RUN_HERE = {
    "make demo": "installation: `make test` is what .ci/run runs on a fresh clone",
    "python3 -m venv .venv && . .venv/bin/activate": "installation, as `make` does it",
    "docker compose up --build": "needs a Docker engine; test_deploy checks the compose file",
    "docker compose --profile observe up --build": "needs a Docker engine; test_deploy "
    "validates the profile and test_dashboard the dashboard",
}
"""Blocks this test does not run, by their first command, and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Shell:
    """Commands run as a user would type them, from the repository's root."""

    def __init__(self, logs: Path, **env: str) -> None:
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
        clean.pop("NATS_URL", None)
        self.env = {**clean, "PATH": path, "PYTHONUNBUFFERED": "1", **env}
        self.logs = logs
        self.background: list[tuple[str, subprocess.Popen[bytes]]] = []

    def do(self, command: str) -> subprocess.CompletedProcess[str] | None:
        """Run `command`: an `export` sets a variable, a long-running one starts in the
        background, anything else runs to its end; return what it printed (None if it runs
        on)."""
        if command.startswith("export "):
            name, _, value = command.removeprefix("export ").partition("=")
            self.env[name] = value
            return None
        if command.endswith("&") or LONG_RUNNING.match(command):
            log = self.logs / f"bg{len(self.background)}.log"
            process = subprocess.Popen(
                ["bash", "-c", f"exec {command.rstrip('&').strip()}"], cwd=ROOT, env=self.env,
                stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            self.background.append((command, process))
            return None
        return subprocess.run(["bash", "-c", command], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=180)  # fmt: skip

    def until(
        self,
        command: str,
        ok: Callable[[subprocess.CompletedProcess[str]], bool],
        timeout: float = 90,
    ) -> subprocess.CompletedProcess[str]:
        """Run `command` until `ok` holds of what it did (a pipeline still starting up)."""
        give_up = time.monotonic() + timeout
        while True:
            done = self.do(command)
            assert done is not None
            if ok(done) or time.monotonic() > give_up:
                return done
            time.sleep(0.5)

    def said(self, tail: int = 3000) -> str:
        """The end (`tail` characters) of what each background command printed."""
        return "\n".join(f"--- {command}:\n{log.read_text(errors='replace')[-tail:]}"
                         for log, (command, _) in zip(sorted(self.logs.glob("bg*.log"),
                                                             key=lambda p: int(p.stem[2:])),
                                                      self.background, strict=False))  # fmt: skip

    def stop(self) -> dict[str, int]:
        """SIGTERM every background command, newest first; return how each exited."""
        codes = {}
        for command, process in reversed(self.background):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                codes[command] = process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                codes[command] = process.wait(10)
        self.background.clear()
        return codes


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    made = Shell(tmp_path)
    try:
        yield made
    finally:
        made.stop()


def test_every_walkthrough_is_run_or_says_why_not():
    covered = {*NOT_RUN_HERE, *WALKTHROUGHS}
    for block in sh_blocks():
        assert block[0] in covered, f"a README block no test runs: {block}"


def test_separate_deployables(shell):
    block = block_with("python -m services.rag &")
    port = free_port()
    outputs = []
    for command in block:
        command = command.replace("127.0.0.1:4222", f"127.0.0.1:{port}")
        if command.startswith("orchestrator server"):
            command = command.replace("orchestrator server", f"orchestrator server --port {port}")
        outputs.append(shell.do(command))
    ask = outputs[-1]
    assert ask is not None and ask.returncode == 0, ask.stderr
    assert "Question: What is JetStream?" in ask.stdout  # the echo worker answers the prompt
    codes = shell.stop()
    assert all(code == 0 for command, code in codes.items() if "services." in command), codes


def test_scaling_with_affinity(shell, nats_server):
    shell.env["ORCH_NATS_URL"] = nats_server.url
    up, status = block_with("orchestrator up --instances 3")
    shell.do(up)
    stages = ("rag", "assemble", "inference", "post", "stream")

    def all_joined(done: subprocess.CompletedProcess[str]) -> bool:
        return all(done.stdout.count(f"{stage}-") >= 3 for stage in stages)

    shown = shell.until(status, all_joined)  # instances join one by one, in any order
    assert shown.returncode == 0, shown.stderr
    assert all_joined(shown), shown.stdout
    # The processes share one log: each of its lines names the instance that wrote it.
    said = shell.said(tail=10**7)
    for stage in stages:
        tags = set(re.findall(rf"INFO \[({stage}-[^\]]+)\] ", said))
        assert len(tags) == 3, (stage, tags)
    assert shell.stop()[up] == 0


def test_compose_for_a_pipeline_of_your_own(shell, tmp_path):
    [*_, compose] = block_with("docker compose up --build")
    # `my/pipeline.toml` stands for the reader's own file; the moderated example is one.
    mine = ROOT / "docs" / "examples" / "moderated" / "pipeline.toml"
    command = compose.replace("my/pipeline.toml", str(mine))
    command = command.replace("> docker-compose.yml", f"> {tmp_path / 'docker-compose.yml'}")
    done = shell.do(command)
    assert done is not None and done.returncode == 0, done.stderr
    written = (tmp_path / "docker-compose.yml").read_text(encoding="utf-8")
    assert "moderate:" in written and "translate:" in written


def test_your_own_stages(shell, nats_server):
    shell.env["ORCH_NATS_URL"] = nats_server.url
    validate, up, ask = block_with("orchestrator --config docs/examples/moderated/pipeline.toml up")
    checked = shell.do(validate)
    assert checked is not None and checked.returncode == 0, checked.stderr
    assert "translate" in checked.stdout
    shell.do(up)
    answered = shell.do(ask)
    assert answered is not None and answered.returncode == 0, answered.stderr
    hops = [hop["stage"] for hop in json.loads(answered.stdout)["hops"]]
    assert hops == ["rag", "assemble", "inference", "translate", "post", "moderate", "stream"]
    moderated = shell.do("orchestrator ask 'darn it' --session s --timeout 60")
    assert moderated is not None and moderated.returncode == 3, moderated.stderr
    # Without the pipeline file the moderate stage is not a channel the replay knows: the dry
    # run says so, as the replay itself would, instead of promising a replay.
    config = "--config docs/examples/moderated/pipeline.toml"
    unknown = shell.do("orchestrator dlq replay --stage moderate --dry-run")
    assert unknown is not None and unknown.returncode == 1
    assert unknown.stdout.strip() == "would replay 0 of 1 entries"
    assert "not a channel of this pipeline" in unknown.stderr and "--config" in unknown.stderr
    known = shell.do(f"orchestrator {config} dlq replay --stage moderate --dry-run")
    assert known is not None and known.returncode == 0, known.stderr
    assert known.stdout.strip() == "would replay 1 of 1 entries"
    # And status names the stages it cannot show, rather than leaving them out unsaid.
    status = shell.do("orchestrator status")
    assert status is not None and status.returncode == 0, status.stderr
    assert "not in this pipeline file: moderate, translate;" in status.stdout
    assert "not in this pipeline file" not in shell.do(f"orchestrator {config} status").stdout
    assert shell.stop()[up] == 0


async def publish_expired(url: str, count: int) -> None:
    client = await Client.connect(settings_for(stage_env(url)), url)
    try:
        for i in range(count):
            await client.publish(f"too late {i}", "s", deadline=time.time() - 1)
    finally:
        await client.close()


def test_dead_letter_operations(shell, nats_server, tmp_path):
    cure = tmp_path / "cured"
    shell.env.update(
        ORCH_NATS_URL=nats_server.url,
        ORCH_STAGES__INFERENCE__OPTIONS__WORKER="tests.workers:poison",
        ORCH_STAGES__INFERENCE__MAX_DELIVER="2",
        ORCH_STAGES__INFERENCE__BACKOFF="[0.05]",
        POISON_CURE=str(cure),
    )
    shell.do("orchestrator up")
    # Entries 1 to 41: requests that expired before rag got them; 42: a poisoned one.
    asyncio.run(publish_expired(nats_server.url, 41))
    shell.until("orchestrator dlq ls --json", lambda done: len(done.stdout.splitlines()) == 41)
    failed = shell.do("orchestrator ask 'a poison pill' --session s --timeout 60")
    assert failed is not None and failed.returncode == 3, failed.stderr
    assert "dead-lettered by inference as failed" in failed.stderr

    status, ls, show, dry, replay, purge = block_with("orchestrator dlq show 42")
    listed = shell.do(ls)
    assert listed is not None and listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == 2 and " failed " in listed.stdout
    shown = shell.do(show)
    assert shown is not None and shown.returncode == 0, shown.stderr
    assert "a poison pill" in shown.stdout
    would = shell.do(dry)
    assert would is not None and would.stdout.strip() == "would replay 1 of 1 entries"
    cure.touch()
    replayed = shell.do(replay)
    assert replayed is not None and replayed.returncode == 0, replayed.stderr
    purged = shell.do(purge)  # none is older than 7 days: nothing goes
    assert purged is not None and purged.returncode == 0, purged.stderr
    final = shell.until(status, lambda done: "in flight 0" in done.stdout.replace(":", ""))
    assert final.returncode == 0, final.stderr
    assert shell.stop()["orchestrator up"] == 0


def test_observing_the_mesh(shell, nats_server):
    shell.env["ORCH_NATS_URL"] = nats_server.url
    port = str(free_port())
    export, otel, up, ask, ready, scrape = (
        command.replace("9464", port) for command in block_with("export ORCH_HTTP__PORT=9464")
    )
    for command in (export, otel, up):
        shell.do(command)
    asked = shell.until(ask, lambda done: done.returncode == 0)
    assert asked.returncode == 0, asked.stderr + shell.said()
    assert "Question: What is NATS?" in asked.stdout  # the echo worker's answer
    assert '"name": "orchestrator publish"' in asked.stderr  # the console exporter's span
    assert '"name"' not in asked.stdout  # which leaves the answer alone
    readiness = shell.until(ready, lambda done: done.stdout.strip() == "ready")
    assert readiness.stdout.strip() == "ready"
    scraped = shell.do(scrape)
    assert scraped is not None and scraped.returncode == 0, scraped.stderr
    forwarded = [line for line in scraped.stdout.splitlines() if 'outcome="forwarded"' in line]
    assert {line.split('stage="')[1].split('"')[0] for line in forwarded} == {
        "rag", "assemble", "inference", "post", "stream"
    }  # fmt: skip
    assert all(line.endswith(" 1.0") for line in forwarded), forwarded
    assert shell.stop()[up] == 0


WALKTHROUGHS = {
    "orchestrator server &": test_separate_deployables,
    "orchestrator up --instances 3": test_scaling_with_affinity,
    "orchestrator validate docs/examples/moderated/pipeline.toml": test_your_own_stages,
    "orchestrator status": test_dead_letter_operations,
    "export ORCH_HTTP__PORT=9464": test_observing_the_mesh,
}
"""The blocks run here, by their first command."""
