"""One hop of the FastStream baseline: the same hop as `bench.raw_hop`, in FastStream's idiom.

Written against FastStream 0.7.8 (`faststream[nats]`, on nats-py 2.16): a `NatsBroker` with
one `@broker.subscriber(..., stream=JStream(...), durable=..., pull_sub=PullSub(...))` handler
that forwards with `await broker.publish(..., stream=...)`, run by `FastStream(broker).run()`.
FastStream is an optional comparison, not a dependency: `pip install 'faststream[nats]'`.

    python -m bench.faststream_hop URL HOP HOPS

What the FastStream defaults would otherwise do, and what is set here to match `raw_hop`:

- `stream="NAME"` or `JStream(name)` declares the stream at start-up (`declare=True`) with
  FastStream's defaults; if the stream exists with another config it *updates* it to those
  (on a limits stream that silently resets e.g. max_msgs_per_subject; on a work queue the
  server refuses, err 10052, and the broker fails to start). `declare=False` just binds to
  the stream `bench.topology` made.
- An existing durable is only looked up (`consumer_info`) and bound, never altered (nats-py's
  `pull_subscribe`); the consumer config FastStream would create with is never sent.
- `PullSub` fetches `batch_size` messages per pull and runs the handler on all of them
  concurrently (an anyio task group), like raw_hop's gather; `timeout` is raw_hop's fetch wait.
- Acks: the default `REJECT_ON_ERROR` acks after the handler returned, but on an exception it
  *terminates* the message (`AckTerm`: a work queue drops it). `NACK_ON_ERROR` naks instead,
  so a failed forward is redelivered, as raw_hop's missing ack leads to.
- `broker.publish(..., stream=S)` is a JetStream publish that awaits the PubAck (with the
  header `Nats-Expected-Stream: S`); its default timeout is 0.5 s, not nats-py's 5 s.
  FastStream also adds the headers `content-type` (empty for bytes) and `correlation_id`.
- Without a decoder FastStream tries `json.loads` on every payload that has no content-type;
  the decoder below hands the handler the raw bytes, which are forwarded unchanged.
- The handler's `NatsMessage` parameter is FastDepends context injection; FastDepends 3.0.9
  runs the sync `Context.use` in a worker thread (anyio.to_thread), per message. This is the
  documented idiom and is kept; `NatsBroker(apply_types=False)` avoids DI altogether.
- SIGTERM (and SIGINT) stop the app: no new fetches, in-flight handlers get up to
  `graceful_timeout` seconds, then the connection is drained and the process exits with 0.
"""

import asyncio
import sys

from faststream import AckPolicy, FastStream
from faststream.message import StreamMessage
from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub
from nats.aio.msg import Msg

from bench.topology import raw_consumer, raw_next_subject

BATCH = 64
FETCH_WAIT = 1.0
PUBLISH_TIMEOUT = 5.0  # nats-py's JetStream default, which raw_hop uses
GRACEFUL_TIMEOUT = 15.0


async def raw_body(msg: StreamMessage[Msg]) -> bytes:
    """Decoder: the payload as it arrived (async: FastStream runs a sync one in a thread)."""
    return msg.body


def next_stream(hop: int, hops: int) -> str:
    """The stream that stores what hop `hop` publishes."""
    return "RAW_RESULTS" if hop == hops else raw_consumer(hop + 1)[0]


def build_app(url: str, hop: int, hops: int) -> FastStream:
    """A FastStream app that runs hop `hop` (1-based) of `hops`."""
    broker = NatsBroker(
        url,
        max_reconnect_attempts=-1,
        graceful_timeout=GRACEFUL_TIMEOUT,
        logger=None,
    )
    stream, durable = raw_consumer(hop)
    target = next_stream(hop, hops)

    @broker.subscriber(
        f"raw.h{hop}.*",
        stream=JStream(stream, declare=False),
        durable=durable,
        pull_sub=PullSub(batch_size=BATCH, timeout=FETCH_WAIT),
        ack_policy=AckPolicy.NACK_ON_ERROR,
        decoder=raw_body,
    )
    async def forward(body: bytes, msg: NatsMessage) -> None:
        rid = msg.headers["Req-Id"]
        headers = {"Req-Id": rid, "Sent-At": msg.headers["Sent-At"], "Nats-Msg-Id": f"{rid}:{hop}"}
        await broker.publish(
            body,
            raw_next_subject(hop, hops, rid, msg.raw_message.subject),
            headers=headers,
            correlation_id=msg.correlation_id,
            stream=target,
            timeout=PUBLISH_TIMEOUT,
        )

    return FastStream(broker, logger=None)


async def main(url: str, hop: int, hops: int) -> None:
    """Run hop `hop` (1-based) until SIGTERM."""
    await build_app(url, hop, hops).run()


if __name__ == "__main__":
    try:  # the same event loop as the project's stages use, for a like-for-like comparison
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
