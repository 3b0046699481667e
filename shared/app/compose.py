"""`orchestrator compose`: a docker-compose file for the pipeline's graph, one service a stage.

The repository's docker-compose.yml is this command's output for the built-in graph (a test
keeps them equal); for a pipeline file of your own, its directory is mounted at /config, so
handler modules beside the file are importable in the containers.

Every stage container serves /metrics, /healthz and /readyz on STAGE_PORT; its healthcheck is
`orchestrator health`, which asks /healthz there. The `observe` profile adds Prometheus,
scraping every stage service (every replica of it), and Grafana with the dashboard in
deploy/grafana. The scrape configuration for the built-in graph is deploy/prometheus/
prometheus.yml (`prometheus_config` writes it); a pipeline with other stages gets its own
written into the compose file, since compose files cannot carry a config file's content
everywhere (docker-compose 1.x has no `configs.content`).
"""

import argparse
import os
import sys
from pathlib import Path

from services import DEFAULT_GRAPH
from shared.app.args import command
from shared.app.load import load
from shared.errors import ConfigError
from shared.graph import Graph
from shared.settings import Settings

NATS_IMAGE = "nats:2.12-alpine"
PROMETHEUS_IMAGE = "prom/prometheus:v3.5.0"
GRAFANA_IMAGE = "grafana/grafana:12.1.0"
STAGE_PORT = 9464
"""Where each stage container serves /metrics, /healthz and /readyz."""
PROFILE = "observe"
"""The compose profile that runs Prometheus and Grafana beside the mesh."""
BUILT_IN_STAGES = list(DEFAULT_GRAPH["stages"])
"""The stages deploy/prometheus/prometheus.yml scrapes."""
PROMETHEUS_FILE = "deploy/prometheus/prometheus.yml"
RESERVED = ("nats", "prometheus", "grafana")
"""Service names of the compose file's own; no stage may take one."""


def add_compose_command(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register `compose`."""
    command(
        sub,
        "compose",
        "print a docker-compose file for the pipeline's stages",
        "Print a docker-compose file for the pipeline (--config or $ORCH_CONFIG, else the "
        "built-in graph): NATS with JetStream, and one service per stage running `orchestrator "
        "run STAGE`, with a restart policy, a healthcheck over HTTP and a drain period; with "
        "the `observe` profile, Prometheus scraping every stage and Grafana with the "
        "orchestrator dashboard (from deploy/). With a pipeline file, its directory is mounted "
        "read-only at /config (paths relative to where you run this). Write it with "
        "`orchestrator compose > docker-compose.yml`.",
    )


def run_compose(args: argparse.Namespace) -> int:
    """Print the compose file; the exit code."""
    settings = load(args.config)
    sys.stdout.write(render(settings, Graph(settings), settings.source))
    return 0


def render(settings: Settings, graph: Graph, config: Path | None) -> str:
    """The compose file's text."""
    for name in RESERVED:
        if name in graph.names:
            raise ConfigError(
                f"a stage named {name!r} would clash with the compose file's {name} service"
            )
    grace = int(settings.drain_timeout) + 10
    environment = [
        "    ORCH_NATS_URL: nats://nats:4222",
        "    # /metrics, /healthz and /readyz on the container's address: Prometheus scrapes",
        "    # it, and the healthcheck (`orchestrator health`) asks /healthz.",
        "    ORCH_HTTP__HOST: 0.0.0.0",
        f'    ORCH_HTTP__PORT: "{STAGE_PORT}"',
        "    # A container's host name outlives its restarts: a restarted stage takes its",
        "    # partitions back at once.",
        '    ORCH_INSTANCE: "{host}"',
    ]
    volumes = []
    if config is not None:
        mount = os.path.relpath(config.resolve().parent)
        environment.append(f"    ORCH_CONFIG: /config/{config.name}")
        volumes = ["  volumes:", f"    - ./{mount}:/config:ro"]
    lines = [
        "# NATS with JetStream plus one service per stage of the pipeline, written by",
        "# `orchestrator compose` from the stage graph (scale one with",
        "# `docker compose up --scale <stage>=3`). Stages declare the streams and their",
        "# consumers idempotently on start, so they may start in any order.",
        f"# `docker compose --profile {PROFILE} up` adds Prometheus (127.0.0.1:9090), scraping",
        "# every stage container, and Grafana (127.0.0.1:3000) with the orchestrator dashboard.",
        "",
        "x-stage: &stage",
        "  build: .",
        "  image: prompt-orchestrator:latest",
        "  restart: unless-stopped",
        "  environment:",
        *environment,
        *volumes,
        "  depends_on:",
        "    nats:",
        "      condition: service_healthy",
        "  # SIGTERM starts a drain: in-flight messages are finished before the process exits.",
        f"  stop_grace_period: {grace}s",
        "  healthcheck:",
        "    # GET /healthz: 503 once the stage's loops stop turning (`orchestrator health",
        "    # --ready` asks /readyz: connected and consuming).",
        '    test: ["CMD", "orchestrator", "health"]',
        "    interval: 10s",
        "    timeout: 5s",
        "    start_period: 20s",
        "    retries: 3",
        "",
        "services:",
        "  nats:",
        f"    image: {NATS_IMAGE}",
        '    command: ["-js", "-sd", "/data", "-m", "8222"]',
        "    restart: unless-stopped",
        "    ports:",
        '      - "127.0.0.1:4222:4222"',
        "      # Monitoring: /varz, /jsz, /connz, /healthz.",
        '      - "127.0.0.1:8222:8222"',
        "    volumes:",
        "      - nats-data:/data",
        "    healthcheck:",
        '      test: ["CMD", "wget", "-q", "-O", "-", '
        '"http://127.0.0.1:8222/healthz?js-enabled-only=true"]',
        "      interval: 5s",
        "      timeout: 3s",
        "      retries: 10",
    ]
    for stage in graph:
        lines += ["", f"  {stage.name}:", "    <<: *stage",
                  f'    command: ["orchestrator", "run", "{stage.name}"]']  # fmt: skip
    lines += ["", *_observe(graph.names)]
    lines += ["", "volumes:", "  nats-data:", "  prometheus-data:", ""]
    return "\n".join(lines)


def prometheus_config(stages: list[str]) -> str:
    """Prometheus's configuration: scrape every container of each stage service."""
    return "\n".join(
        [
            "global:",
            "  scrape_interval: 5s",
            "  evaluation_interval: 5s",
            "",
            "scrape_configs:",
            "  - job_name: orchestrator",
            "    # Each name is a compose service: Docker's DNS answers with the address of",
            "    # every container of it (`--scale`), looked up again every refresh_interval.",
            "    dns_sd_configs:",
            "      - names:",
            *(f"          - {name}" for name in stages),
            "        type: A",
            f"        port: {STAGE_PORT}",
            "        refresh_interval: 10s",
            "    relabel_configs:",
            "      # The service a target belongs to: `up{service=...}` says which stage is down.",
            "      - source_labels: [__meta_dns_name]",
            "        target_label: service",
            "",
        ]
    )


def _observe(stages: list[str]) -> list[str]:
    """Prometheus and Grafana, in the `observe` profile."""
    lines = [
        "  prometheus:",
        f"    image: {PROMETHEUS_IMAGE}",
        f'    profiles: ["{PROFILE}"]',
        "    restart: unless-stopped",
        "    ports:",
        '      - "127.0.0.1:9090:9090"',
    ]
    data = ["      - prometheus-data:/prometheus"]
    if stages == BUILT_IN_STAGES:
        lines += [
            "    command:",
            '      - "--config.file=/etc/prometheus/prometheus.yml"',
            '      - "--storage.tsdb.path=/prometheus"',
            '      - "--storage.tsdb.retention.time=7d"',
            "    volumes:",
            f"      - ./{PROMETHEUS_FILE}:/etc/prometheus/prometheus.yml:ro",
            *data,
        ]
    else:
        # This pipeline's stages, not the built-in ones deploy/prometheus names: the
        # configuration travels in the environment and is written to a file at start.
        config = prometheus_config(stages).rstrip("\n").split("\n")
        lines += [
            "    environment:",
            "      # The scrape configuration for this pipeline's stages.",
            "      PROMETHEUS_CONFIG: |",
            *(f"        {line}" if line else "" for line in config),
            '    entrypoint: ["/bin/sh", "-c"]',
            "    command:",
            '      - echo "$$PROMETHEUS_CONFIG" > /etc/prometheus/prometheus.yml',
            "        && exec /bin/prometheus --config.file=/etc/prometheus/prometheus.yml",
            "        --storage.tsdb.path=/prometheus --storage.tsdb.retention.time=7d",
            "    volumes:",
            *data,
        ]
    lines += [
        "",
        "  grafana:",
        f"    image: {GRAFANA_IMAGE}",
        f'    profiles: ["{PROFILE}"]',
        "    restart: unless-stopped",
        "    depends_on:",
        "      - prometheus",
        "    environment:",
        "      # Anyone who reaches 127.0.0.1:3000 may look; editing needs the admin login.",
        '      GF_AUTH_ANONYMOUS_ENABLED: "true"',
        "      GF_AUTH_ANONYMOUS_ORG_ROLE: Viewer",
        "      GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH: "
        "/etc/grafana/dashboards/orchestrator.json",
        "    ports:",
        '      - "127.0.0.1:3000:3000"',
        "    volumes:",
        "      - ./deploy/grafana/provisioning:/etc/grafana/provisioning:ro",
        "      - ./deploy/grafana/dashboards:/etc/grafana/dashboards:ro",
    ]
    return lines
