"""The `orchestrator` command line."""

import argparse
import asyncio
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
from shared.errors import ConfigError, OrchestratorError
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

DESCRIPTION = """\
Run LLM prompt pipelines as a mesh of stages on NATS JetStream:
rag -> assemble -> inference -> post -> stream.

The NATS server comes from --nats-url, else $ORCH_NATS_URL or $NATS_URL, else the pipeline
file's nats_url. `demo` and `up` start an embedded nats-server when none is configured;
the other commands default to nats://127.0.0.1:4222, where `up` puts its server when the
port is free.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="orchestrator",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="pipeline TOML file (default: $ORCH_CONFIG)")
    p.add_argument("--nats-url", help="NATS server URL (overrides environment and config)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the whole pipeline once with sample requests")
    demo.add_argument("--requests", type=int, default=10, help="how many requests (default 10)")

    up = sub.add_parser(
        "up",
        help="run all five stages until Ctrl-C/SIGTERM",
        description="Run the whole pipeline. By default all five stages run in this process; "
        "with --instances N (or `instances` per stage in the pipeline file) every stage "
        "instance is its own process, so one machine can use all its cores.",
    )
    up.add_argument("--instances", type=int, help="processes per stage (default: from config)")

    run = sub.add_parser("run", help="run one stage until Ctrl-C/SIGTERM")
    run.add_argument("stage", choices=_stage_names(), help="the stage to run")

    sub.add_parser("declare", help="create or update the streams and consumers, then exit")

    server = sub.add_parser("server", help="run a local nats-server with JetStream (foreground)")
    server.add_argument("--port", type=int, default=4222, help="port on 127.0.0.1 (default 4222)")
    server.add_argument("--store", type=Path, default=None, help="JetStream store directory")

    for name, help_text in (
        ("publish", "submit a request; print its id"),
        ("ask", "submit a request and print its result"),
    ):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("text", help="the request's input text")
        cmd.add_argument("--session", required=True, help="session id (any string)")
        cmd.add_argument("--request-id", help="request id (default: generated)")
        cmd.add_argument(
            "--meta", action="append", default=[], metavar="KEY=VALUE", help="metadata, repeatable"
        )
        cmd.add_argument("--ttl", type=float, help="deadline: seconds from now")
        if name == "ask":
            cmd.add_argument("--timeout", type=float, default=30.0, help="seconds to wait")
            cmd.add_argument("--json", action="store_true", help="print the whole result as JSON")

    health = sub.add_parser("health", help="exit 0 if a stage process reported itself healthy")
    health.add_argument("--file", type=Path, help="the stage's health_file (default: from config)")
    health.add_argument("--max-age", type=float, default=15.0, help="seconds (default 15)")

    add_dlq_commands(sub, _stage_names())

    result = sub.add_parser("result", help="print the stored result of a request (or wait)")
    result.add_argument("request_id")
    result.add_argument("--timeout", type=float, default=0.0, help="seconds to wait (default 0)")
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
        "deadline": time.time() + args.ttl if args.ttl else None,
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
                print(f"no result stored for {args.request_id}", file=sys.stderr)
                return 1
            result = found
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
