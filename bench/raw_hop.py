"""One hop of the raw nats-py baseline: fetch a batch, publish it all, ack what was stored.

Two idioms, the fastest straightforward ones for a durable pull consumer that acks only after
the next stream has stored the message:

- "batch": `js.publish` of every message of the fetched batch at once (asyncio.gather);
- "async": `js.publish_async` for the batch, then the futures of their acks awaited.

A message whose publish failed (the next stream full, no ack) is nak'ed with a short delay
and comes again: the baseline queues, it never drops. nats-py 2.16's `publish_async` raises
a stream's error reply (e.g. a full stream) inside its reply callback instead of setting it
on the future, so that future never completes: each is awaited for at most
ASYNC_ACK_TIMEOUT (FastStream's publish timeout), as a careful user of it has to. The payload
is not parsed; the request id travels in a header.

With "checked", each message gets the work a project stage does on it besides moving it:
decoded and validated as an `Envelope`, a hop record appended, encoded again. That measures
the cost of checking every message apart from the cost of the project's runtime. A message
that fails the check is terminated (the baseline has no dead-letter stream).

    python -m bench.raw_hop URL HOP HOPS [batch|async] [checked]
"""

import asyncio
import signal
import sys
import time
from collections.abc import Awaitable, Callable

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from bench.topology import raw_consumer, raw_next_subject
from shared.errors import InvalidMessage

BATCH = 64
FETCH_WAIT = 1.0
RETRY_DELAY = 0.05  # seconds before a message whose publish failed comes again
ASYNC_ACK_TIMEOUT = 0.5


async def _quiet_when_full(exc: Exception) -> None:
    # publish_async's refused publishes surface here (see above) and are nak'ed once their
    # wait runs out: a careful user of it drops them rather than log a traceback for each.
    if not isinstance(exc, nats.js.errors.ServiceUnavailableError):
        print(f"raw_hop: {exc!r}", file=sys.stderr)


def checker(hop: int) -> Callable[[bytes, float], bytes]:
    """What a project stage does to a message besides moving it: data and when it was
    received in, the message to publish out (InvalidMessage if it is bad)."""
    # Imported here: the unchecked baseline's memory stays that of nats-py alone.
    from shared.envelope import Envelope, Hop, decode, encode

    name = f"h{hop}"

    def check(data: bytes, received: float) -> bytes:
        envelope = decode(data, Envelope, 1 << 20)
        envelope.hops.append(Hop(stage=name, instance=name, received=received,
                                 done=time.time()))  # fmt: skip
        return encode(envelope)

    return check


async def main(
    url: str,
    hop: int,
    hops: int,
    idiom: str = "batch",
    *,
    checked: bool = False,
    stop: asyncio.Event | None = None,
) -> None:
    """Run hop `hop` (1-based) until SIGTERM, or until `stop` is set when given."""
    nc = await nats.connect(url, max_reconnect_attempts=-1, error_cb=_quiet_when_full)
    js = nc.jetstream()
    stream, durable = raw_consumer(hop)
    psub = await js.pull_subscribe_bind(durable=durable, stream=stream)
    check = checker(hop) if checked else None
    if stop is None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    def forward(msg: Msg, data: bytes) -> Awaitable[object]:
        rid = msg.headers["Req-Id"]  # type: ignore[index]
        headers = {"Req-Id": rid, "Sent-At": msg.headers["Sent-At"],  # type: ignore[index]
                   "Nats-Msg-Id": f"{rid}:{hop}"}  # fmt: skip
        subject = raw_next_subject(hop, hops, rid, msg.subject)
        if idiom == "async":
            return js.publish_async(subject, data, headers=headers)
        return js.publish(subject, data, headers=headers)

    while not stop.is_set():
        try:
            msgs = await psub.fetch(BATCH, timeout=FETCH_WAIT)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        if check is not None:
            received, kept, payloads = time.time(), [], []
            for m in msgs:
                try:
                    payloads.append(check(m.data, received))
                except InvalidMessage:
                    await m.term()
                else:
                    kept.append(m)
            msgs = kept
        else:
            payloads = [m.data for m in msgs]
        sends = [forward(m, data) for m, data in zip(msgs, payloads, strict=True)]
        if idiom == "async":  # publish_async hands back the ack's future
            sends = [asyncio.wait_for(await s, ASYNC_ACK_TIMEOUT) for s in sends]
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        for m, outcome in zip(msgs, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                await m.nak(delay=RETRY_DELAY)
            else:
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
    url, hop, hops, *rest = sys.argv[1:]
    asyncio.run(main(url, int(hop), int(hops), *rest[:1], checked="checked" in rest[1:]))
