"""Deliveries lost between the server and a stage come back without waiting out ack_wait."""

import asyncio

from shared.transport.pull import JetStreamPuller
from tests.support import in_process_pipeline


async def test_a_busy_stage_has_a_delivery_lost_on_the_way_again_before_ack_wait(
    nats_server, monkeypatch
):
    receive, dropped = JetStreamPuller._receive, []

    def lossy(
        self: JetStreamPuller, subject: str, reply: str, data: bytes, headers: dict | None
    ) -> None:
        if not dropped and reply and b"lose me" in data:
            dropped.append(subject)  # as a route dying with the delivery on it would
            return
        receive(self, subject, reply, data, headers)

    monkeypatch.setattr(JetStreamPuller, "_receive", lossy)
    async with in_process_pipeline(nats_server.url, ORCH_STAGES__RAG__ACK_WAIT="60") as (
        _, _, client, _,
    ):  # fmt: skip
        stop = asyncio.Event()

        async def keep_busy() -> None:  # an idle stage finds its losses another way
            i = 0
            while not stop.is_set():
                await client.publish(f"keep busy {i}", f"s{i % 4}")
                i += 1
                await asyncio.sleep(0.02)

        busy = asyncio.create_task(keep_busy())
        try:
            await asyncio.sleep(0.5)
            result = await client.ask("lose me", "s0", timeout=20)  # well before ack_wait
        finally:
            stop.set()
            await busy
    assert dropped and "lose me" in result.output
