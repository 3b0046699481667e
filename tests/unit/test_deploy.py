"""The compose file and Dockerfile describe the deployables the stage graph has."""

import shutil
import subprocess

import pytest
import yaml

from shared.app.compose import render
from shared.app.load import load
from shared.graph import Graph
from tests.support import ROOT, STAGE_NAMES


def test_compose_file_is_what_orchestrator_compose_writes_for_the_default_graph(monkeypatch):
    monkeypatch.delenv("ORCH_CONFIG", raising=False)
    settings = load()
    expected = render(settings, Graph(settings), None)
    assert (ROOT / "docker-compose.yml").read_text(encoding="utf-8") == expected, (
        "docker-compose.yml is stale: run `orchestrator compose > docker-compose.yml`"
    )


def test_compose_has_nats_and_every_stage_with_restart_and_healthcheck():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert "-js" in services["nats"]["command"]
    assert "nats-data:/data" in services["nats"]["volumes"]
    assert set(services) == {"nats", *STAGE_NAMES}
    for stage in STAGE_NAMES:
        svc = services[stage]
        assert svc["command"] == ["orchestrator", "run", stage]
        assert svc["restart"] == "unless-stopped"
        assert svc["healthcheck"]["test"] == ["CMD", "orchestrator", "health"]
        assert svc["environment"]["ORCH_NATS_URL"] == "nats://nats:4222"


def test_a_pipeline_file_of_its_own_is_mounted_and_each_of_its_stages_is_a_service(tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text('[stages.post]\nnext = "extra"\n[stages.extra]\nhandler = "m:f"\n'
                      'next = "stream"\n', encoding="utf-8")  # fmt: skip
    settings = load(config)
    compose = yaml.safe_load(render(settings, Graph(settings), config))
    extra = compose["services"]["extra"]
    assert extra["command"] == ["orchestrator", "run", "extra"]
    assert extra["environment"]["ORCH_CONFIG"] == "/config/pipeline.toml"
    assert extra["volumes"][0].endswith(":/config:ro")


def _compose_command() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]):
            probe = subprocess.run([*cmd, "version"], capture_output=True, timeout=30)
            if probe.returncode == 0:
                return cmd
    return None


def test_compose_file_validates_with_compose():
    # `docker compose config` needs no engine, only the compose tool.
    cmd = _compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    done = subprocess.run([*cmd, "config", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    clustered = ["-f", "docker-compose.yml", "-f", "docker-compose.cluster.yml"]
    done = subprocess.run([*cmd, *clustered, "config", "-q"], cwd=ROOT, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_the_clustered_profile_has_three_routed_nodes_and_every_stage_on_r3():
    text = (ROOT / "docker-compose.cluster.yml").read_text(encoding="utf-8")
    services = yaml.safe_load(text)["services"]
    nodes = ["nats", "nats-2", "nats-3"]
    routes = ",".join(f"nats://{node}:6222" for node in nodes)
    for node in nodes:
        command = services[node]["command"]
        assert "-js" in command and command[command.index("--routes") + 1] == routes
    assert set(services) == {*nodes, *STAGE_NAMES}
    for stage in STAGE_NAMES:
        env = services[stage]["environment"]
        assert env["ORCH_REPLICAS"] == "3"
        assert env["ORCH_NATS_URL"] == ",".join(f"nats://{node}:4222" for node in nodes)


def test_dockerfile_installs_the_stages():
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "COPY services ./services" in text
    assert "HEALTHCHECK" in text
