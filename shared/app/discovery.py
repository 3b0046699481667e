"""Discovery: every stage instance answers the NATS micro protocol.

Each instance is a service named `orchestrator-stage` (`nats micro ls` lists every instance;
`$SRV.PING.orchestrator-stage` finds them all) with its stage and instance in the metadata.
Its one endpoint, `status` on `<prefix>.stages.status.<instance>`, answers a request with the
same JSON that `$SRV.STATS` carries as the endpoint's `data`: the stage, the instance, the
partitions it owns now, and its counters and latency histograms (shared.metrics.snapshot).
"""

from collections.abc import Mapping
from typing import Any

import orjson

from shared import __version__
from shared.metrics import Metrics
from shared.runtime.group import StageGroup
from shared.runtime.loop import StageRuntime
from shared.transport.connection import Bus
from shared.transport.service import Endpoint, Reply

SERVICE = "orchestrator-stage"
"""The micro service name every stage instance shares."""


def status_of(rt: StageRuntime, metrics: Metrics | None) -> dict[str, Any]:
    """What an instance says about itself: stage, instance, partitions and counters."""
    owned = sorted(rt.affinity.owned) if rt.affinity is not None else []
    report: dict[str, Any] = {"stage": rt.name, "instance": rt.instance, "partitions": owned,
                              "ready": rt.ready}  # fmt: skip
    if metrics is not None:
        report.update(metrics.snapshot(rt.name, rt.instance))
    return report


async def announce(bus: Bus, group: StageGroup) -> list[Endpoint]:
    """Start a micro service for every stage instance in `group` (reporting what the group's
    metrics recorded); stop them when done."""
    metrics, topology = group.metrics, group.topology
    endpoints = []
    for rt in group.runtimes:

        async def answer(_: bytes, __: Mapping[str, str], reply: Reply,
                         rt: StageRuntime = rt) -> None:  # fmt: skip
            await reply(orjson.dumps(status_of(rt, metrics)))

        endpoints.append(
            await bus.serve(
                name=SERVICE,
                version=__version__,
                description=f"prompt-orchestrator stage {rt.name}",
                subject=topology.status_subject(rt.instance),
                queue_group=rt.instance,
                handler=answer,
                metadata={"stage": rt.name, "instance": rt.instance},
                endpoint="status",
                stats=lambda rt=rt: status_of(rt, metrics),
            )
        )
    return endpoints
