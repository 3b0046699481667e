"""The `orchestrator` command line."""

import argparse
import asyncio
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson

from shared.dlq_cli import add_commands as add_dlq_commands
from shared.dlq_cli import run_dlq, run_status
from shared.envelope import MetaValue
from shared.errors import ConfigError, OrchestratorError, ResultTimeout
from shared.natsserver import EmbeddedNats, port_is_free
from shared.runner import (
    DEFAULT_URL,
    check_health,
    configure_logging,
    declare,
    install_event_loop_policy,
    serve,
)
from shared.settings import Settings, load_settings

DEFAULT_PORT = 4222
NO_RESULT = 1
"""Exit code of `result` and `ask` when there is no result (in time): an answer, not an error."""

DESCRIPTION = """\
Run LLM prompt pipelines as a mesh of stages on NATS JetStream:
rag -> assemble -> inference -> post -> stream.

The NATS server comes from --nats-url, else $ORCH_NATS_URL or $NATS_URL, else the pipeline
file's nats_url. `demo` and `up` start an embedded nats-server when none is configured;
the other commands default to nats://127.0.0.1:4222, where `up` puts its server when the
port is free.
"""


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1 to 65535."""
    value = _whole(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, got {text}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def global_options(default: object = None) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name (`demo --nats-url ...`)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--config", type=Path, default=default, help="pipeline TOML file (default: $ORCH_CONFIG)"
    )
    p.add_argument(
        "--nats-url", default=default, help="NATS server URL (overrides environment and config)"
    )
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    return p


SUBCOMMAND_OPTIONS = global_options(argparse.SUPPRESS)
"""Parent parser for subcommands: given after the command, the options override; absent,
they leave the values given before it alone."""


def _command(
    sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
    name: str,
    help: str,
    description: str,
) -> argparse.ArgumentParser:
    """A subcommand with a one-line `help` (in the command list) and a `description`."""
    return sub.add_parser(name, help=help, description=description, parents=[SUBCOMMAND_OPTIONS])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="orchestrator",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[global_options()],
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = _command(
        sub,
        "demo",
        "run the whole pipeline once with sample requests",
        "Run the five stages in this process, send N sample requests through them, print "
        "each answer and a per-stage latency table (queue wait and handling time, p50/p99), "
        "then drain and stop. With no NATS URL configured it starts an embedded nats-server "
        "on a free 127.0.0.1 port with a temporary store, removed afterwards.",
    )
    demo.add_argument(
        "--requests", type=positive_int, default=10, help="how many requests (default 10)"
    )

    up = _command(
        sub,
        "up",
        "run all five stages until Ctrl-C/SIGTERM",
        "Run the whole pipeline until Ctrl-C/SIGTERM, then drain. By default all five stages "
        "run in this process; with --instances N (or `instances` per stage in the pipeline "
        "file) every stage instance is its own process, so one machine can use all its cores. "
        "With no NATS URL configured it starts an embedded nats-server: on 127.0.0.1:4222 "
        "with its store in ~/.cache/prompt-orchestrator (kept across restarts) when that port "
        "is free, else on a free port with a temporary store removed when it stops.",
    )
    up.add_argument(
        "--instances", type=positive_int, help="processes per stage (default: from config)"
    )

    run = _command(
        sub,
        "run",
        "run one stage until Ctrl-C/SIGTERM",
        "Run one stage in this process until Ctrl-C/SIGTERM, then drain: stop pulling, "
        "finish what it holds, ack, hand its partitions over and exit 0. The same as "
        "`python -m services.STAGE`. It declares the streams on start and creates its own "
        "consumer for the partitions it owns.",
    )
    run.add_argument("stage", choices=_stage_names(), help="the stage to run")

    _command(
        sub,
        "declare",
        "create or update the streams, then exit",
        "Create the pipeline's streams, or bring their settings in line with the "
        "configuration, and print one line per stream: created, unchanged or updated (with "
        "what changed). Consumers are not declared: each stage instance creates its own when "
        "it starts, with that instance's settings. Stages declare the streams on start too, "
        "so this only does it up front.",
    )

    server = _command(
        sub,
        "server",
        "run a local nats-server with JetStream (foreground)",
        "Run a nats-server with JetStream on 127.0.0.1 in the foreground until "
        "Ctrl-C/SIGTERM. Its JetStream store is --store (kept), or else a temporary directory "
        "that is removed when the server stops. A store serves one server at a time: a "
        "store another running nats-server uses is refused.",
    )
    server.add_argument(
        "--port", type=port_number, default=DEFAULT_PORT, help="port on 127.0.0.1 (default 4222)"
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
        cmd = _command(sub, name, help_text, description)
        cmd.add_argument("text", help="the request's input text")
        cmd.add_argument("--session", required=True, help="session id (any string)")
        cmd.add_argument("--request-id", help="request id (default: generated)")
        cmd.add_argument(
            "--meta", action="append", default=[], metavar="KEY=VALUE", help="metadata, repeatable"
        )
        cmd.add_argument(
            "--ttl", type=positive_float, help="deadline: seconds from now (default: none)"
        )
        if name == "ask":
            cmd.add_argument(
                "--timeout", type=positive_float, default=30.0, help="seconds to wait (default 30)"
            )
            cmd.add_argument("--json", action="store_true", help="print the whole result as JSON")

    health = _command(
        sub,
        "health",
        "exit 0 if a stage process reported itself healthy",
        "Exit 0 if a stage process touched its health file (health_file / ORCH_HEALTH_FILE) "
        "within --max-age seconds, which it does while its loops are turning; else say so "
        "and exit 1. Meant for container health checks.",
    )
    health.add_argument("--file", type=Path, help="the stage's health_file (default: from config)")
    health.add_argument(
        "--max-age", type=non_negative_float, default=15.0, help="seconds (default 15)"
    )

    add_dlq_commands(sub, _stage_names())

    result = _command(
        sub,
        "result",
        "print the stored result of a request (or wait)",
        "Print the result of a request (results are kept for results.max_age, one hour by "
        "default); with --timeout, wait up to that many seconds for it. Exits 1 if there is "
        "no result, with or without waiting.",
    )
    result.add_argument("request_id")
    result.add_argument(
        "--timeout", type=non_negative_float, default=0.0, help="seconds to wait (default 0)"
    )
    result.add_argument("--json", action="store_true", help="print the whole result as JSON")
    return p


def _stage_names() -> list[str]:
    from services.registry import STAGES

    return list(STAGES)


def _metadata(pairs: list[str]) -> dict[str, MetaValue]:
    out: dict[str, MetaValue] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--meta wants KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def _request_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options `publish` and `ask` share: metadata, request id, deadline."""
    return {
        "metadata": _metadata(args.meta),
        "request_id": args.request_id,
        "deadline": time.time() + args.ttl if args.ttl is not None else None,
    }


def _url(settings: Settings) -> str:
    return settings.nats_url or DEFAULT_URL


async def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from shared.demo import run_demo

    if settings.nats_url:
        await run_demo(settings, settings.nats_url, args.requests, sys.stdout)
        return 0
    with EmbeddedNats() as server:
        print(f"embedded nats-server on {server.url} (pid {server.pid})", file=sys.stderr)
        await run_demo(settings, server.url, args.requests, sys.stdout)
    return 0


async def _cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from services.registry import PIPELINE
    from shared.supervisor import plan, supervise

    stages = plan(settings, list(PIPELINE), args.instances)
    separate = args.instances is not None or len(stages) > len(PIPELINE)

    async def run(url: str) -> int:
        if separate:
            return await supervise(stages, url, args.config)
        await serve(settings, list(PIPELINE), url)
        return 0

    if settings.nats_url:
        return await run(settings.nats_url)
    # The default port when it is free, so that `orchestrator ask` etc. find it unconfigured,
    # with a store kept across restarts. Otherwise another `up` probably holds that port and
    # the store: this server gets a free port and a temporary store of its own (a store
    # serves one server at a time; EmbeddedNats refuses a store in use).
    if port_is_free(DEFAULT_PORT):
        server = EmbeddedNats(store_dir=up_store(), port=DEFAULT_PORT)
    else:
        server = EmbeddedNats()
    with server:
        print(f"embedded nats-server on {server.url}, store {server.store_dir}", file=sys.stderr)
        if server.port != DEFAULT_PORT:
            print(f"(port {DEFAULT_PORT} is taken: pass --nats-url {server.url} to other "
                  "commands; the store is removed when this stops)", file=sys.stderr)  # fmt: skip
        return await run(server.url)


def up_store() -> Path:
    """The store of the server `up` starts on the default port: kept across restarts."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "prompt-orchestrator"


async def _cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from services.registry import STAGES

    await serve(settings, [STAGES[args.stage]], _url(settings))
    return 0


async def _cmd_declare(args: argparse.Namespace, settings: Settings) -> int:
    from shared.bus import Bus

    bus = await Bus.connect(_url(settings), name="orchestrator-declare", wait=5.0)
    try:
        for line in await declare(bus, settings):
            print(line)
    finally:
        await bus.close()
    return 0


async def _cmd_server(args: argparse.Namespace, settings: Settings) -> int:
    server = EmbeddedNats(store_dir=args.store, port=args.port)
    try:  # a signal may arrive at any point, even while starting or during the prints
        server.start()
        kept = "" if args.store else " (temporary: removed when the server stops)"
        print(f"nats-server on {server.url} (pid {server.pid}), store {server.store_dir}{kept}")
        print("press Ctrl-C to stop", flush=True)
        process = server.process
        assert process is not None
        code = await asyncio.to_thread(process.wait)
        print(f"nats-server exited with {code}", file=sys.stderr)
        return 1
    finally:
        server.stop()
        server.cleanup()  # only a store it created itself


async def _cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    from shared.client import Client

    client = await Client.connect(settings, _url(settings))
    try:
        request_id = await client.publish(args.text, args.session, **_request_options(args))
    finally:
        await client.close()
    print(request_id)
    return 0


async def _cmd_ask(args: argparse.Namespace, settings: Settings) -> int:
    from shared.client import Client

    client = await Client.connect(settings, _url(settings))
    try:
        result = await client.ask(
            args.text, args.session, timeout=args.timeout, **_request_options(args)
        )
    except ResultTimeout as exc:
        print(f"{exc} (the request was accepted: `orchestrator result {exc.request_id}` "
              "reads its result later)", file=sys.stderr)  # fmt: skip
        return NO_RESULT
    finally:
        await client.close()
    print(result.model_dump_json(indent=2) if args.json else result.output)
    return 0


async def _cmd_result(args: argparse.Namespace, settings: Settings) -> int:
    from shared.client import Client

    client = await Client.connect(settings, _url(settings))
    try:
        if args.timeout > 0:
            result = await client.result(args.request_id, timeout=args.timeout)
        else:
            found = await client.stored_result(args.request_id)
            if found is None:
                print(f"no result for request {args.request_id}", file=sys.stderr)
                return NO_RESULT
            result = found
    except ResultTimeout as exc:
        print(str(exc), file=sys.stderr)
        return NO_RESULT
    finally:
        await client.close()
    print(orjson.dumps(result.model_dump(), option=orjson.OPT_INDENT_2).decode()
          if args.json else result.output)  # fmt: skip
    return 0


async def _cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    path = args.file or settings.health_file
    if path is None:
        raise ConfigError("no health file: pass --file or set health_file / ORCH_HEALTH_FILE")
    if check_health(path, args.max_age):
        return 0
    print(f"unhealthy: {path} missing or older than {args.max_age:g}s", file=sys.stderr)
    return 1


async def _with_bus(args: argparse.Namespace, settings: Settings) -> int:
    from shared.bus import Bus

    bus = await Bus.connect(_url(settings), name=f"orchestrator-{args.command}", wait=5.0)
    try:
        if args.command == "status":
            return await run_status(args, settings, bus)
        return await run_dlq(args, settings, bus)
    finally:
        await bus.close()


Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]
COMMANDS: dict[str, Command] = {
    "demo": _cmd_demo,
    "up": _cmd_up,
    "run": _cmd_run,
    "declare": _cmd_declare,
    "server": _cmd_server,
    "publish": _cmd_publish,
    "ask": _cmd_ask,
    "result": _cmd_result,
    "health": _cmd_health,
    "status": _with_bus,
    "dlq": _with_bus,
}


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
        settings = load_settings(args.config, nats_url=args.nats_url)
        install_event_loop_policy()
        code = asyncio.run(COMMANDS[args.command](args, settings))
    except KeyboardInterrupt:
        code = 130
    except OrchestratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)
