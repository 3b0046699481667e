"""`orchestrator worker serve`: one of the inference stage's models as a service over NATS.

It builds the model named by `--model` from the pipeline's inference options (its worker and
that worker's settings), starts it (a local model loads here), and answers requests on
`<prefix>.workers.<model>` in the queue group `workers`, as a NATS micro service named
`orchestrator-worker` (`nats micro ls` and `$SRV.PING` find it). Each request is a JSON
object (`prompt`, `session_id`); its answer is a stream of JSON messages on the request's
inbox: `{"text": ...}` as the model generates, `{"heartbeat": true}` each second it is quiet,
then `{"done": true, "usage": {...}}` or `{"error": ..., "permanent": bool}`. SIGTERM stops
taking requests, finishes those under way, and closes the model.
"""

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Mapping

import msgspec
import orjson

from shared import __version__
from shared.app.args import SUBCOMMAND_OPTIONS, command
from shared.app.commands import url_of
from shared.envelope import Usage
from shared.errors import ConfigError
from shared.settings import Settings
from shared.transport.connection import Bus
from shared.transport.service import Reply
from shared.workers.base import ModelWorker, start
from shared.workers.errors import ModelRefused
from shared.workers.models import DEFAULT
from shared.workers.remote import HEARTBEAT, worker_subject

log = logging.getLogger(__name__)
SERVICE = "orchestrator-worker"
QUEUE_GROUP = "workers"


def add_worker_command(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register `worker serve`."""
    worker = command(
        sub,
        "worker",
        "serve a model to inference stages over NATS",
        "Model workers as processes of their own, which inference stages reach over NATS with "
        'worker = "remote". `worker serve` runs one.',
    )
    ops = worker.add_subparsers(dest="worker_command", required=True, metavar="OPERATION")
    serve = ops.add_parser(
        "serve",
        help="run a model as a NATS service until Ctrl-C/SIGTERM",
        description="Build the inference stage's model --model (from the pipeline file: its "
        "worker and that worker's settings), start it, and answer requests for it on "
        "<prefix>.workers.<model> in a queue group shared with the other workers of that "
        "model, as the NATS micro service orchestrator-worker. SIGTERM finishes what is under "
        "way, then stops.",
        parents=[SUBCOMMAND_OPTIONS],
    )
    serve.add_argument("--model", default=DEFAULT, help="the model's name (default: default)")


def model_worker(settings: Settings, name: str) -> ModelWorker:
    """The worker of the inference stage's model `name`."""
    from services.inference.stage import Options

    decl = settings.stages.get("inference")
    if decl is None:
        raise ConfigError("the pipeline has no inference stage, whose models a worker serves")
    options = Options.model_validate(decl.options)
    models = {DEFAULT: options, **options.models}
    if name not in models:
        raise ConfigError(f"no model {name!r}; the inference stage's: {', '.join(models)}")
    chosen = models[name]
    if chosen.worker == "remote":
        raise ConfigError(f"model {name!r} is itself remote: serve the model it asks for")
    return chosen.build()


async def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    """`orchestrator worker serve`."""
    worker = model_worker(settings, args.model)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await start(worker)
    bus = await Bus.connect(url_of(settings), name=f"{SERVICE}-{args.model}", wait=30.0)
    try:
        subject = worker_subject(settings.subject_prefix, args.model)
        endpoint = await bus.serve(
            name=SERVICE, version=__version__, description=f"model {args.model}",
            subject=subject, queue_group=QUEUE_GROUP,
            handler=lambda data, headers, reply: answer(worker, data, headers, reply),
            metadata={"model": args.model},
        )  # fmt: skip
        log.info("serving model %s on %s", args.model, subject)
        await stop.wait()
        log.info("stopping: finishing %d requests under way", endpoint.in_flight)
        await endpoint.stop(drain=settings.drain_timeout)
    finally:
        await bus.close()
        await worker.aclose()
    log.info("stopped")
    return 0


async def answer(
    worker: ModelWorker, data: bytes, headers: Mapping[str, str], reply: Reply
) -> None:
    """Stream one request's answer to its requester, with heartbeats while it is quiet."""

    async def send(**fields: object) -> None:
        await reply(orjson.dumps(fields))

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            await send(heartbeat=True)

    beating = asyncio.create_task(heartbeat())
    try:
        request = orjson.loads(data)
        prompt, session = str(request["prompt"]), str(request.get("session_id", ""))
        usage = None
        async for item in worker.stream(prompt, session_id=session):
            if isinstance(item, Usage):
                usage = item
            else:
                await send(text=item)
        usage = usage or Usage(model=type(worker).__name__)
        await send(done=True, usage=msgspec.to_builtins(usage))
    except ModelRefused as exc:
        await send(error=str(exc), permanent=True)
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        await send(error=f"malformed request: {exc!r}", permanent=True)
    except Exception as exc:  # the stage retries, or asks another worker
        await send(error=f"{type(exc).__name__}: {exc}", permanent=False)
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
