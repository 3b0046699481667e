"""The `orchestrator` command line: its parser and the dispatch to each command."""

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from shared import telemetry
from shared.app import commands, operate
from shared.app.args import (
    Parser,
    command,
    global_options,
    meta_pair,
    non_negative_float,
    port_number,
    positive_float,
    positive_int,
    request_id,
    session_id,
)
from shared.app.compose import add_compose_command, run_compose
from shared.app.load import load
from shared.app.process import configure_logging, install_event_loop_policy
from shared.app.validate import add_validate_command, run_validate
from shared.app.workerd import add_worker_command, run_worker
from shared.errors import OrchestratorError

DESCRIPTION = """\
Run LLM prompt pipelines as a mesh of stages on NATS JetStream. The stages form a graph
declared in the pipeline file; by default rag -> assemble -> inference -> post -> stream.

The NATS server comes from --nats-url, else $ORCH_NATS_URL or $NATS_URL, else the pipeline
file's nats_url. `demo` and `up` start an embedded nats-server when none is configured;
the other commands default to nats://127.0.0.1:4222, where `up` puts its server when the
port is free.
"""


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="orchestrator",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[global_options()],
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = command(
        sub,
        "demo",
        "run the whole pipeline once with sample requests",
        "Run every stage of the pipeline in this process, send N sample requests through "
        "them, print each answer and a per-stage latency table (queue wait and handling time, "
        "p50/p99), then drain and stop. The answers come from a real model (Gemma 3 270M, run "
        "here by llama.cpp) unless --worker echo. With no NATS URL configured it starts an "
        "embedded nats-server on a free 127.0.0.1 port with a temporary store, removed "
        "afterwards.",
    )
    demo.add_argument(
        "--requests", type=positive_int, default=10, help="how many requests (default 10)"
    )
    demo.add_argument(
        "--worker",
        choices=["local", "echo"],
        default="local",
        help="who answers: a real model run here by llama.cpp (the `local` extra; default), "
        "or echo, which answers with the prompt",
    )

    up = command(
        sub,
        "up",
        "run every stage until Ctrl-C/SIGTERM",
        "Run the whole pipeline until Ctrl-C/SIGTERM, then drain. By default every stage runs "
        "in this process; with --instances N (or `instances` per stage in the pipeline file) "
        "every stage instance is its own process, so one machine can use all its cores. With "
        "no NATS URL configured it starts an embedded nats-server: on 127.0.0.1:4222 with its "
        "store in ~/.cache/prompt-orchestrator (kept across restarts) when that port is free, "
        "else on a free port with a temporary store removed when it stops. With [http] port "
        "set (ORCH_HTTP__PORT), the separate processes serve /metrics on that port and the "
        "ones after it, one each, in the order the stages are listed.",
    )
    up.add_argument(
        "--instances", type=positive_int, help="processes per stage (default: from config)"
    )

    run = command(
        sub,
        "run",
        "run one stage until Ctrl-C/SIGTERM",
        "Run one stage of the pipeline in this process until Ctrl-C/SIGTERM, then drain: stop "
        "pulling, finish what it holds, ack, hand its partitions over and exit 0. For a "
        "built-in stage, the same as `python -m services.STAGE`. It declares the streams on "
        "start and creates its own consumer for the partitions it owns.",
    )
    run.add_argument("stage", help="the stage to run, by its name in the pipeline file")

    command(
        sub,
        "declare",
        "create or update the streams, then exit",
        "Create the pipeline's streams, or bring their settings in line with the "
        "configuration, and print one line per stream: created, unchanged or updated (with "
        "what changed). Consumers are not declared: each stage instance creates its own when "
        "it starts, with that instance's settings. Stages declare the streams on start too, "
        "so this only does it up front.",
    )

    add_validate_command(sub)
    add_compose_command(sub)

    server = command(
        sub,
        "server",
        "run a local nats-server with JetStream (foreground)",
        "Run a nats-server with JetStream on 127.0.0.1 in the foreground until "
        "Ctrl-C/SIGTERM. Its JetStream store is --store (kept), or else a temporary directory "
        "that is removed when the server stops. A store serves one server at a time: a "
        "store another running nats-server uses is refused.",
    )
    server.add_argument(
        "--port",
        type=port_number,
        default=commands.DEFAULT_PORT,
        help="port on 127.0.0.1 (default 4222)",
    )
    server.add_argument("--store", type=Path, default=None, help="JetStream store directory")

    for name, help_text, description in (
        (
            "publish",
            "submit a request; print its id",
            "Submit a request to the pipeline's intake and print its id once the server has "
            "stored it. `orchestrator result ID` reads its result.",
        ),
        (
            "ask",
            "submit a request and print its result",
            "Submit a request and wait for its result; print the answer (the whole result "
            "with --json). Exits 1 if no result arrives within --timeout.",
        ),
    ):
        cmd = command(sub, name, help_text, description)
        cmd.add_argument("text", help="the request's input text")
        cmd.add_argument(
            "--session", type=session_id, required=True, help="session id (any string)"
        )
        cmd.add_argument("--request-id", type=request_id, help="request id (default: generated)")
        cmd.add_argument(
            "--meta",
            type=meta_pair,
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="metadata, repeatable",
        )
        cmd.add_argument(
            "--ttl", type=positive_float, help="deadline: seconds from now (default: none)"
        )
        if name == "ask":
            cmd.add_argument(
                "--timeout", type=positive_float, default=30.0, help="seconds to wait (default 30)"
            )
            cmd.add_argument("--json", action="store_true", help="print the whole result as JSON")
            cmd.add_argument(
                "--stream",
                action="store_true",
                help="print the answer's tokens as the model generates them",
            )

    result = command(
        sub,
        "result",
        "print the stored result of a request (or wait)",
        "Print the result of a request (results are kept for results.max_age, one hour by "
        "default); with --timeout, wait up to that many seconds for it. Exits 1 if there is "
        "no result, with or without waiting.",
    )
    result.add_argument("request_id", type=request_id)
    result.add_argument(
        "--timeout", type=non_negative_float, default=0.0, help="seconds to wait (default 0)"
    )
    result.add_argument("--json", action="store_true", help="print the whole result as JSON")

    health = command(
        sub,
        "health",
        "exit 0 if a stage process is healthy (or, with --ready, ready)",
        "Meant for container health checks. With [http] port set (ORCH_HTTP__PORT), GET "
        "/healthz of the stage process's endpoint on this host (/readyz with --ready) and exit "
        "0 if it answers 200; else print why in one line and exit 1. Without a port, exit 0 "
        "if the process touched its health file (health_file / ORCH_HEALTH_FILE) within "
        "--max-age seconds, which it does while its loops are turning; else say so and exit 1.",
    )
    health.add_argument(
        "--ready",
        action="store_true",
        help="ask /readyz: connected and consuming, not starting or draining (HTTP only)",
    )
    health.add_argument(
        "--timeout",
        type=positive_float,
        default=3.0,
        help="seconds the HTTP endpoint has to answer (default 3)",
    )
    health.add_argument(
        "--file",
        type=Path,
        help="check this health file, not the HTTP endpoint (default: from config)",
    )
    health.add_argument(
        "--max-age", type=non_negative_float, default=15.0, help="seconds (default 15)"
    )

    operate.add_commands(sub)
    add_worker_command(sub)
    return p


COMMANDS: dict[str, commands.Command] = {
    "demo": commands.demo,
    "up": commands.up,
    "run": commands.run,
    "declare": commands.declare_streams,
    "server": commands.server,
    "publish": commands.publish,
    "ask": commands.ask,
    "result": commands.result,
    "health": commands.health,
    "status": operate.with_bus,
    "dlq": operate.with_bus,
    "worker": run_worker,
}
WITHOUT_SETTINGS = {"validate": run_validate, "compose": run_compose}
"""Commands that load the pipeline file themselves, to report on it."""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, load settings once, run the command; exit 2 on a reported error."""
    args = _parser().parse_args(argv)
    # SIGTERM ends a command like Ctrl-C does, so an embedded nats-server is always stopped.
    # (Commands that drain install their own handlers while they run.)
    signal.signal(signal.SIGTERM, _interrupt)
    configure_logging(args.verbose)
    try:
        if args.command in WITHOUT_SETTINGS:
            code = WITHOUT_SETTINGS[args.command](args)
        else:
            settings = load(args.config, nats_url=args.nats_url)
            stage = getattr(args, "stage", None) if args.command == "run" else None
            telemetry.configure(f"orchestrator-{stage}" if stage else "orchestrator")
            install_event_loop_policy()
            code = asyncio.run(COMMANDS[args.command](args, settings))
    except KeyboardInterrupt:
        code = 130
    except OrchestratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except BrokenPipeError:  # `orchestrator dlq ls | head`: the reader has all it wanted
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + signal.SIGPIPE
    sys.exit(code)


def stage_main(stage: str) -> None:
    """Entry point of `python -m services.<stage>`: `orchestrator run <stage>`, with the
    options that takes (--config, --nats-url, -v, --help)."""
    main(["run", stage, *sys.argv[1:]])
