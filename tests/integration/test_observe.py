"""What an operator sees over HTTP: /metrics of every stage process, /healthz and /readyz."""

import asyncio
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from shared.app.natsserver import EmbeddedNats, free_port
from shared.client import Client, RequestDeadLettered
from tests.support import (
    STAGE_NAMES,
    StageProcess,
    orchestrator_command,
    settings_for,
    stage_env,
    wait_until_consuming,
)


def get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:port/path."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return 0, ""


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and wanted <= ls)


async def test_each_stage_process_counts_what_it_handled_on_metrics(nats_server, tmp_path):
    ports = {stage: free_port() for stage in STAGE_NAMES}
    procs = []
    try:
        for stage in STAGE_NAMES:
            env = stage_env(nats_server.url, ORCH_HTTP__PORT=str(ports[stage]))
            procs.append(StageProcess(stage, env, tmp_path))
        settings = settings_for(env)
        await wait_until_consuming(nats_server.url, settings)
        n = 12
        async with await Client.connect(settings, nats_server.url) as client:
            ids = [await client.publish(f"what is request {i}?", f"obs-{i % 3}") for i in range(n)]
            for rid in ids:
                await client.result(rid, timeout=60)
            # A model nobody configured: refused at inference, dead-lettered as failed.
            bad = await client.publish("which model?", "obs-x", metadata={"model": "missing"})
            try:
                await client.result(bad, timeout=60)
                raise AssertionError("a request for an unknown model completed")
            except RequestDeadLettered as exc:
                assert exc.stage == "inference"

        scraped = {}
        for stage, port in ports.items():
            status, text = get(port, "/metrics")
            assert status == 200, stage
            scraped[stage] = samples(text)
        for stage in STAGE_NAMES:
            found = scraped[stage]
            forwarded = value(found, "orchestrator_messages_total", stage=stage,
                              outcome="forwarded")  # fmt: skip
            # The bad request passed the stages before inference.
            expected = n + 1 if stage in ("rag", "assemble") else n
            assert forwarded == expected, (stage, forwarded)
            # ... and inference was called for it too.
            called = n + 1 if stage in ("rag", "assemble", "inference") else n
            calls = value(found, "orchestrator_handler_duration_seconds_count", stage=stage)
            assert calls == called, (stage, calls)
            waits = value(found, "orchestrator_queue_wait_seconds_count", stage=stage)
            assert waits == called, (stage, waits)
            assert value(found, "orchestrator_partitions_owned", stage=stage) == 8
            channel = "orchestrator_channel_messages"
            partitions = {dict(ls)["partition"] for n, ls in found
                          if n == channel and ("stage", stage) in ls}  # fmt: skip
            assert partitions == {str(p) for p in range(8)}, (stage, partitions)
            assert value(found, "orchestrator_channel_messages", stage=stage) == 0  # all done
            assert value(found, "orchestrator_in_flight", stage=stage) == 0
        inference = scraped["inference"]
        assert value(inference, "orchestrator_dead_letters_total", reason="failed") == 1
        assert value(inference, "orchestrator_messages_total", outcome="dead_lettered") == 1
        assert value(inference, "orchestrator_model_tokens_total", model="default",
                     direction="output") > 0  # fmt: skip
        last = scraped["stream"]
        assert value(last, "orchestrator_request_duration_seconds_count") == n
        assert value(last, "orchestrator_request_duration_seconds_sum") > 0
        assert value(scraped["rag"], "orchestrator_dead_letters_total") == 0
        for port in ports.values():
            assert get(port, "/healthz")[0] == 200
            assert get(port, "/readyz")[0] == 200
            assert get(port, "/nothing")[0] == 404
    finally:
        for p in procs:
            if p.proc and p.proc.poll() is None:
                p.signal(signal.SIGTERM)
        assert all(p.stop() == 0 for p in procs)


async def wait_for(port: int, path: str, status: int, timeout: float = 30.0) -> None:
    """Until GET path answers `status`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (found := await asyncio.to_thread(get, port, path))[0] != status:
        assert loop.time() < deadline, f"{path} still answers {found[0]}, not {status}"
        await asyncio.sleep(0.05)


async def test_readyz_is_503_until_the_stage_consumes_and_again_while_it_drains(tmp_path: Path):
    nats_port, http_port = free_port(), free_port()
    # The stage starts before its NATS server: alive, not ready.
    slow = {"ORCH_STAGES__INFERENCE__OPTIONS__ECHO__TOKEN_DELAY": "0.3",
            "ORCH_HTTP__PORT": str(http_port)}  # fmt: skip
    env = stage_env(f"nats://127.0.0.1:{nats_port}", **slow)
    inference = StageProcess("inference", env, tmp_path)
    server = EmbeddedNats(store_dir=tmp_path / "nats", port=nats_port)
    others: list[StageProcess] = []
    try:
        await wait_for(http_port, "/healthz", 200)
        assert get(http_port, "/readyz")[0] == 503
        await asyncio.sleep(1.0)
        assert get(http_port, "/readyz")[0] == 503  # still: nothing to connect to
        server.start()
        await wait_for(http_port, "/readyz", 200)

        # A request the slow model takes seconds over is under way when SIGTERM comes: the
        # stage drains it, and says it is not ready meanwhile.
        others = [StageProcess(s, env | {"ORCH_HTTP__PORT": "0"}, tmp_path)
                  for s in STAGE_NAMES if s != "inference"]  # fmt: skip
        settings = settings_for(env)
        await wait_until_consuming(server.url, settings)
        async with await Client.connect(settings, server.url) as client:
            rid = await client.publish(" ".join(["word"] * 12), "drain-me")
            await wait_for(http_port, "/metrics", 200)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while "orchestrator_in_flight{" not in (text := get(http_port, "/metrics")[1]) or \
                    value(samples(text), "orchestrator_in_flight") < 1:  # fmt: skip
                assert loop.time() < deadline, "the request never reached inference"
                await asyncio.sleep(0.05)
            inference.signal(signal.SIGTERM)
            await wait_for(http_port, "/readyz", 503, timeout=5)
            assert inference.proc is not None and inference.proc.poll() is None  # draining
            assert get(http_port, "/healthz")[0] == 200
            result = await client.result(rid, timeout=60)  # the drain finished it
            assert result.output
        assert inference.wait() == 0
    finally:
        for p in [inference, *others]:
            if p.proc and p.proc.poll() is None:
                p.signal(signal.SIGTERM)
        for p in [inference, *others]:
            p.stop()
        server.stop()


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports on 127.0.0.1."""
    for _ in range(50):
        base = free_port()
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise AssertionError(f"no {count} consecutive free ports")


async def test_up_gives_each_stage_process_its_own_port(nats_server, tmp_path):
    base = free_ports(len(STAGE_NAMES))
    env = stage_env(nats_server.url, ORCH_HTTP__PORT=str(base))
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen([*orchestrator_command(), "up", "--instances", "1"], env=env,
                          stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    log.close()
    try:
        for i, stage in enumerate(STAGE_NAMES):
            await wait_for(base + i, "/readyz", 200)
            status, text = get(base + i, "/metrics")
            assert status == 200
            stages = {ls["stage"] for (name, ls) in ((n, dict(ls)) for n, ls in samples(text))
                      if name == "orchestrator_partitions_owned"}  # fmt: skip
            assert "instance=" not in text.replace("stage_instance=", "")
            assert stages == {stage}, (base + i, stages)
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0, (tmp_path / "up.log").read_text()
