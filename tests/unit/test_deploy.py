"""The compose file and Dockerfile describe the deployables the stage graph has."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shared.app.compose import BUILT_IN_STAGES, STAGE_PORT, prometheus_config, render
from shared.app.load import load
from shared.errors import ConfigError
from shared.graph import Graph
from tests.support import ROOT, STAGE_NAMES

OBSERVERS = {"prometheus", "grafana"}


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
    assert set(services) == {"nats", *STAGE_NAMES, *OBSERVERS}
    for stage in STAGE_NAMES:
        svc = services[stage]
        assert svc["command"] == ["orchestrator", "run", stage]
        assert svc["restart"] == "unless-stopped"
        # With the port set, `orchestrator health` asks the stage's /healthz.
        assert svc["healthcheck"]["test"] == ["CMD", "orchestrator", "health"]
        env = svc["environment"]
        assert env["ORCH_NATS_URL"] == "nats://nats:4222"
        assert env["ORCH_HTTP__PORT"] == str(STAGE_PORT)
        assert env["ORCH_HTTP__HOST"] == "0.0.0.0"
        assert "ORCH_HEALTH_FILE" not in env
        assert "profiles" not in svc


def test_every_published_port_is_on_loopback_and_nats_monitoring_is_published():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))["services"]
    published = {name: svc.get("ports", []) for name, svc in services.items()}
    assert published["nats"] == ["127.0.0.1:4222:4222", "127.0.0.1:8222:8222"]
    assert published["prometheus"] == ["127.0.0.1:9090:9090"]
    assert published["grafana"] == ["127.0.0.1:3000:3000"]
    for ports in published.values():
        assert all(port.startswith("127.0.0.1:") for port in ports)


def test_the_observe_profile_runs_prometheus_on_the_deploy_config_and_grafana_provisioned():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))["services"]
    for name in OBSERVERS:
        assert services[name]["profiles"] == ["observe"]
    mounts = [v.split(":") for name in OBSERVERS for v in services[name]["volumes"]]
    for source, *_ in mounts:
        if source.startswith("./"):  # a file of the repository's, where the service reads it
            assert (ROOT / source).exists(), source
    assert ["./deploy/prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml", "ro"] in mounts
    grafana = services["grafana"]["environment"]
    home = grafana["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/etc/grafana/dashboards/orchestrator.json"
    assert (ROOT / "deploy/grafana/dashboards/orchestrator.json").exists()
    assert grafana["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_the_prometheus_config_in_deploy_scrapes_every_stage_of_the_built_in_graph():
    text = (ROOT / "deploy/prometheus/prometheus.yml").read_text(encoding="utf-8")
    assert yaml.safe_load(text) == yaml.safe_load(prometheus_config(BUILT_IN_STAGES))
    assert BUILT_IN_STAGES == STAGE_NAMES


def test_a_pipeline_file_of_its_own_is_mounted_and_each_of_its_stages_is_a_service(tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text('[stages.post]\nnext = "extra"\n[stages.extra]\nhandler = "m:f"\n'
                      'next = "stream"\n', encoding="utf-8")  # fmt: skip
    settings = load(config)
    compose = yaml.safe_load(render(settings, Graph(settings), config))
    extra = compose["services"]["extra"]
    assert extra["command"] == ["orchestrator", "run", "extra"]
    assert extra["environment"]["ORCH_CONFIG"] == "/config/pipeline.toml"
    assert extra["environment"]["ORCH_HTTP__PORT"] == str(STAGE_PORT)
    assert extra["volumes"][0].endswith(":/config:ro")


def test_a_pipeline_with_other_stages_carries_its_own_scrape_config(tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text('[stages.post]\nnext = "extra"\n[stages.extra]\nhandler = "m:f"\n'
                      'next = "stream"\n', encoding="utf-8")  # fmt: skip
    settings = load(config)
    prometheus = yaml.safe_load(render(settings, Graph(settings), config))["services"]["prometheus"]
    # Not the deploy/ file, which names the built-in stages only.
    assert not any("deploy/prometheus" in v for v in prometheus["volumes"])
    scrape = yaml.safe_load(prometheus["environment"]["PROMETHEUS_CONFIG"])
    (job,) = scrape["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == [*STAGE_NAMES[:4], "extra", "stream"]
    assert sd["port"] == STAGE_PORT
    # Compose reads `$$` as `$`: the shell gets the variable, not compose.
    assert '"$$PROMETHEUS_CONFIG"' in prometheus["command"][0]
    assert prometheus["entrypoint"] == ["/bin/sh", "-c"]


@pytest.mark.parametrize("name", ["nats", "prometheus", "grafana"])
def test_a_stage_named_like_a_service_of_the_compose_file_is_refused(tmp_path, name):
    config = tmp_path / "pipeline.toml"
    config.write_text(f'[stages.post]\nnext = "{name}"\n[stages.{name}]\nhandler = "m:f"\n'
                      'next = "stream"\n', encoding="utf-8")  # fmt: skip
    settings = load(config)
    with pytest.raises(ConfigError, match=f"'{name}' would clash"):
        render(settings, Graph(settings), config)


def _compose_command() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]):
            probe = subprocess.run([*cmd, "version"], capture_output=True, timeout=30)
            if probe.returncode == 0:
                return cmd
    return None


def _validate(cmd: list[str], *args: str, cwd: Path = ROOT) -> None:
    done = subprocess.run([*cmd, *args, "config", "-q"], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_compose_file_validates_with_compose():
    # `docker compose config` needs no engine, only the compose tool.
    cmd = _compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    _validate(cmd)
    _validate(cmd, "--profile", "observe")
    clustered = ["-f", "docker-compose.yml", "-f", "docker-compose.cluster.yml"]
    _validate(cmd, *clustered)
    _validate(cmd, *clustered, "--profile", "observe")


def test_a_pipeline_files_compose_file_validates_with_compose(tmp_path, monkeypatch):
    cmd = _compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    config = tmp_path / "pipeline.toml"
    config.write_text('[stages.post]\nnext = "extra"\n[stages.extra]\nhandler = "m:f"\n'
                      'next = "stream"\n', encoding="utf-8")  # fmt: skip
    monkeypatch.chdir(tmp_path)
    settings = load(config)
    (tmp_path / "docker-compose.yml").write_text(render(settings, Graph(settings), config))
    _validate(cmd, "--profile", "observe", cwd=tmp_path)
    done = subprocess.run([*cmd, "--profile", "observe", "config"], cwd=tmp_path,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]["prometheus"]
    # Left for the container's shell: compose neither expands the variable nor misses it (its
    # output writes a literal `$` as `$$` again).
    assert "PROMETHEUS_CONFIG" not in done.stderr
    assert resolved["command"][0].startswith('echo "$$PROMETHEUS_CONFIG" > ')
    assert (
        "extra"
        in yaml.safe_load(resolved["environment"]["PROMETHEUS_CONFIG"])["scrape_configs"][0][
            "dns_sd_configs"
        ][0]["names"]
    )


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
