"""`orchestrator compose`: a docker-compose file for the pipeline's graph, one service a stage.

The repository's docker-compose.yml is this command's output for the built-in graph (a test
keeps them equal); for a pipeline file of your own, its directory is mounted at /config, so
handler modules beside the file are importable in the containers.
"""

import argparse
import os
import sys
from pathlib import Path

from shared.app.args import command
from shared.app.load import load
from shared.errors import ConfigError
from shared.graph import Graph
from shared.settings import Settings

NATS_IMAGE = "nats:2.12-alpine"


def add_compose_command(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register `compose`."""
    command(
        sub,
        "compose",
        "print a docker-compose file for the pipeline's stages",
        "Print a docker-compose file for the pipeline (--config or $ORCH_CONFIG, else the "
        "built-in graph): NATS with JetStream, and one service per stage running `orchestrator "
        "run STAGE`, with a restart policy, a healthcheck and a drain period. With a pipeline "
        "file, its directory is mounted read-only at /config (paths relative to where you run "
        "this). Write it with `orchestrator compose > docker-compose.yml`.",
    )


def run_compose(args: argparse.Namespace) -> int:
    """Print the compose file; the exit code."""
    settings = load(args.config)
    sys.stdout.write(render(settings, Graph(settings), settings.source))
    return 0


def render(settings: Settings, graph: Graph, config: Path | None) -> str:
    """The compose file's text."""
    if "nats" in graph.names:
        raise ConfigError("a stage named 'nats' would clash with the compose file's NATS service")
    grace = int(settings.drain_timeout) + 10
    environment = [
        "    ORCH_NATS_URL: nats://nats:4222",
        "    ORCH_HEALTH_FILE: /tmp/orchestrator.alive",
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
    lines += ["", "volumes:", "  nats-data:", ""]
    return "\n".join(lines)
