"""One hop of the raw nats-py baseline: fetch a batch, publish it all concurrently, ack.

This is the concurrent-batch variant: the fastest straightforward nats-py idiom for a durable
pull consumer that acks only after the next stream has stored the message. The payload is
not parsed; the request id travels in a header.

    python -m bench.raw_hop URL HOP HOPS
"""

import asyncio
import signal
import sys

import nats
import nats.errors

from bench.topology import raw_consumer, raw_next_subject

BATCH = 64
FETCH_WAIT = 1.0


async def main(url: str, hop: int, hops: int) -> None:
    """Run hop `hop` (1-based) until SIGTERM."""
    nc = await nats.connect(url, max_reconnect_attempts=-1)
    js = nc.jetstream()
    stream, durable = raw_consumer(hop)
    psub = await js.pull_subscribe_bind(durable=durable, stream=stream)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def forward(msg: nats.aio.msg.Msg) -> None:
        rid = msg.headers["Req-Id"]
        headers = {"Req-Id": rid, "Sent-At": msg.headers["Sent-At"], "Nats-Msg-Id": f"{rid}:{hop}"}
        await js.publish(raw_next_subject(hop, hops, rid, msg.subject), msg.data, headers=headers)

    while not stop.is_set():
        try:
            msgs = await psub.fetch(BATCH, timeout=FETCH_WAIT)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        await asyncio.gather(*(forward(m) for m in msgs))
        for m in msgs:
            await m.ack()
    # nats-py's drain waits for fetched messages it never marks done; unsubscribe, then close.
    await psub.unsubscribe()
    await nc.close()


if __name__ == "__main__":
    try:  # the same event loop as the project's stages use, for a like-for-like comparison
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
