"""A next stage away for a while: how many publishes its full channel refuses meanwhile, and
how soon the flow resumes once it is back.

    python -m bench.stall [--seconds S]

The rag stage runs with 400 requests waiting and the assemble channel limited to 50 messages,
while assemble is not running; after S seconds (8) assemble starts. Printed: the publishes
refused (Overloaded) while it was away, and the seconds from its start until all 400 passed
it. Run it with `PYTHONPATH=<another tree>` to measure that tree's stages the same way.
"""

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.app.load import load
from shared.app.natsserver import EmbeddedNats
from shared.envelope import encode, new_request
from shared.errors import Overloaded
from shared.runtime.group import StageGroup, declare
from shared.topology import Topology
from shared.transport import publish as publishing
from shared.transport.connection import Bus

REQUESTS = 400
CAPACITY = 50


class Refusals:
    """Counts the publishes refused for a full stream, in this process."""

    def __init__(self) -> None:
        self.count = 0
        original = publishing.Publisher.publish

        async def counted(publisher: Any, *args: Any, **kwargs: Any) -> int:
            try:
                return await original(publisher, *args, **kwargs)
            except Overloaded:
                self.count += 1
                raise

        publishing.Publisher.publish = counted  # type: ignore[method-assign]


async def stall(seconds: float) -> tuple[int, float]:
    """(refused while assemble was away, seconds until all requests passed it once back)."""
    refusals = Refusals()
    store = Path(tempfile.mkdtemp(prefix="stall-"))
    server = EmbeddedNats(store_dir=store)
    server.start()
    try:
        capacities = {"assemble": {"capacity": CAPACITY}, "rag": {"capacity": 2 * REQUESTS}}
        settings = load(nats_url=server.url, stages=capacities)
        topology = Topology(settings)
        async with await Bus.connect(server.url, name="bench-stall") as bus:
            await declare(bus, topology)
            for i in range(REQUESTS):
                env = new_request("What does a full channel do?", f"stall-{i % 16}")
                await bus.publish(topology.intake_subject(env.session_id), encode(env),
                                  msg_id=env.request_id)  # fmt: skip
            rag = StageGroup(settings, ["rag"], topology)
            rag.start(bus)
            await asyncio.sleep(seconds)
            away = refusals.count
            assemble = StageGroup(settings, ["assemble"], topology)
            assemble.start(bus)
            started, after = time.monotonic(), topology.stream_name("inference")
            while (await bus.admin.stream_state(after)).messages < REQUESTS:  # noqa: ASYNC110 (the server has no event to wait on)
                await asyncio.sleep(0.01)
            resumed = time.monotonic() - started
            await assemble.stop()
            await rag.stop()
        return away, resumed
    finally:
        server.stop()
        shutil.rmtree(store, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="how long assemble is away")
    args = parser.parse_args()
    away, resumed = asyncio.run(stall(args.seconds))
    print(f"refused while assemble was away ({args.seconds:g} s): {away}; "
          f"all {REQUESTS} through assemble {resumed:.2f} s after it started")  # fmt: skip


if __name__ == "__main__":
    main()
