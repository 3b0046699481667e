"""Invalid input, fuzzed: whatever bytes reach a stage, each ends as one `invalid` dead letter.

Hypothesis draws lists of payloads (arbitrary bytes, envelopes with a field missing, of the
wrong type, unknown or huge, other versions, invalid UTF-8, truncated or too deeply nested
JSON, JSON that is not an object, odd session ids) and a raw nats-py client publishes them
straight to the stages' input subjects, next to valid requests sent with the project's client.
The five stages run in this process against a real nats-server. A payload is expected to be
invalid exactly when `decode` rejects it; every such payload must come back from the
dead-letter stream once, byte for byte, with reason `invalid` and the stage and subject it
failed on, and every valid request must complete.
"""

import asyncio
import json
import re
import time
import uuid
from collections import Counter

import hypothesis
import nats
import orjson
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st

from shared.app.load import load
from shared.client import Client
from shared.dlq import DeadLetterQueue
from shared.envelope import Envelope, decode
from shared.errors import InvalidMessage
from shared.runtime.group import StageGroup, declare
from shared.settings import Settings
from shared.topology import DLQ, Topology
from shared.transport.connection import Bus
from tests.support import STAGE_NAMES

MAX_BYTES = 16 * 1024  # small, so "huge" stays far below the server's 1 MB payload limit
PARTITIONS = 4
TIMEOUT = 45.0
STAGE_OF = {("intake" if name == STAGE_NAMES[0] else name): name for name in STAGE_NAMES}
CHANNELS = sorted(STAGE_OF)
FIELDS = ["v", *Envelope.__struct_fields__]
STRING_FIELDS = ["request_id", "session_id", "input"]
MARK = "\u2603BAD-UTF8\u2603"

ODD_SESSIONS = [
    "with.dots.in.it",
    "spaces in the id",
    "*",
    ">",
    "a.*.>",
    "..",
    " ",
    "会话",
    "émoji 🎉 session",
    "tab\tand\nnewline",
    "zero\u200bwidth",
    "x" * 1024,
    'quote"back\\slash',
    "{input}",
    "%s%n",
    "-",
    "ÅÄÖ.*.>.😀",
    "\x7f\x01control",
    "l" * 513,
    "right-to-left \u202e",
]

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
session_ids = st.one_of(st.text(max_size=40), st.sampled_from(ODD_SESSIONS))
meta_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**31), 2**31),
    st.floats(-1e9, 1e9),
    st.text(max_size=8),
)
base_envelopes = st.fixed_dictionaries(
    {
        "v": st.just(1),
        "request_id": st.from_regex(r"[A-Za-z0-9_-]{1,32}", fullmatch=True),
        "session_id": session_ids,
        "input": st.text(max_size=60),
        "created_at": st.floats(0, 2e9),
    },
    optional={
        "metadata": st.dictionaries(st.text(max_size=8), meta_values, max_size=4),
        "data": st.dictionaries(
            st.sampled_from(["context", "prompt", "completion", "output", "other"]),
            json_values,
            max_size=3,
        ),
    },
)
bad_utf8 = st.sampled_from(
    [b"\xff", b"\xfe\xff", b"\x80", b"\xc3\x28", b"\xc0\xaf", b"\xe2\x82", b"\xed\xa0\x80",
     b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"abc\xe9def"]
)  # fmt: skip


class Raw:
    """One payload to publish raw, with a short repr (a falsifying example stays readable)."""

    def __init__(self, kind, channel, partition, data) -> None:
        self.kind, self.channel, self.partition, self.data = kind, channel, partition, data

    def __repr__(self) -> str:
        head = self.data[:80] + (b"..." if len(self.data) > 80 else b"")
        where = f"{self.channel}.{self.partition}"
        return f"Raw({self.kind}, {where}, {len(self.data)} bytes: {head!r})"


def dump(obj, ascii_only=False) -> bytes:
    """JSON as any client might write it: NaN, big numbers and lone surrogates pass through."""
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def payloads(draw):
    """One payload of a randomly chosen kind, aimed at a random stage input subject."""
    kind = draw(
        st.sampled_from(
            ["binary", "missing", "wrong_type", "extra", "version", "huge", "long_session",
             "utf8", "non_object", "truncated", "nested", "odd_session"]
        )
    )  # fmt: skip
    env = draw(base_envelopes)
    if kind == "binary":
        data = draw(st.binary(max_size=200))
    elif kind == "missing":
        env.pop(draw(st.sampled_from(FIELDS)), None)
        data = dump(env)
    elif kind == "wrong_type":
        env[draw(st.sampled_from(FIELDS))] = draw(json_values)
        data = dump(env, draw(st.booleans()))
    elif kind == "extra":
        key = draw(st.text(max_size=20).filter(lambda k: k not in FIELDS))
        env[key] = draw(json_values)
        data = dump(env, draw(st.booleans()))
    elif kind == "version":
        env["v"] = draw(
            st.one_of(json_values, st.sampled_from(["1", 1.0, True, 2, 0, -1, [1], {"v": 1}]))
        )
        data = dump(env)
    elif kind == "huge":
        # Over the size limit, as one field or as many small ones.
        size = draw(st.integers(MAX_BYTES + 1, 3 * MAX_BYTES))
        seed = draw(st.text(min_size=1, max_size=4))
        field = draw(st.sampled_from([*STRING_FIELDS, "metadata", "data"]))
        if field in ("metadata", "data"):
            env[field] = {"k": (seed * size)[:size]}
        else:
            env[field] = (seed * size)[:size]
        data = dump(env)
    elif kind == "long_session":  # within the size limit, beyond the session id's
        env["session_id"] = "s" * draw(st.integers(1025, 8000))
        data = dump(env)
    elif kind == "utf8":
        env[draw(st.sampled_from(STRING_FIELDS))] = MARK
        bad = draw(st.binary(max_size=3)) + draw(bad_utf8) + draw(st.binary(max_size=3))
        data = dump(env).replace(MARK.encode(), bad.replace(b'"', b"").replace(b"\\", b""), 1)
    elif kind == "non_object":
        data = dump(draw(json_values.filter(lambda v: not isinstance(v, dict))))
    elif kind == "truncated":
        whole = dump(env)
        data = whole[: draw(st.integers(0, len(whole) - 1))]
    elif kind == "nested":
        depth = draw(st.integers(1025, 3000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        data = opener * depth + b"1" + closer * depth
    else:  # odd_session: a well-formed envelope, only the session id is unusual
        env["session_id"] = draw(st.sampled_from(ODD_SESSIONS))
        data = dump(env)
    channel = draw(st.sampled_from(CHANNELS))
    partition = draw(st.integers(0, PARTITIONS - 1))
    return Raw(kind, channel, partition, data)


def readable_ids(payload: bytes) -> tuple[str | None, str | None]:
    """The request id (if well formed) and session id (if a string of 1-1024) of a payload
    that is a JSON object to orjson (the stages' parser, stricter than json's), as a
    dead-letter entry records them."""
    try:
        raw = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(raw, dict):
        return None, None
    rid, sid = raw.get("request_id"), raw.get("session_id")
    ok = isinstance(rid, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,128}", rid) is not None
    return (rid if ok else None), (sid if isinstance(sid, str) and 0 < len(sid) <= 1024 else None)


def is_invalid(data: bytes, subject: str, topology: Topology) -> bool:
    """What the stages must conclude: invalid exactly when `decode` says so, when the message
    is not on its session's partition, or when a request at the intake sets stage fields."""
    channel = subject.split(".")[1]
    limit = MAX_BYTES if channel == "intake" else 1 << 20  # later: the server's max_payload
    try:
        env = decode(data, Envelope, limit)
    except InvalidMessage:
        return True
    if subject != topology.subject_for(channel, env.session_id):
        return True
    return channel == "intake" and bool(env.data or env.hops)


def fuzz_settings() -> Settings:
    tag = uuid.uuid4().hex[:10]
    quick = {"backoff": [0.05, 0.1]}  # handler rejections of decodable junk settle fast
    return load(
        subject_prefix=f"fuzz{tag}",
        stream_prefix=f"FUZZ{tag}",
        partitions=PARTITIONS,
        max_message_bytes=MAX_BYTES,
        stages={name: quick for name in STAGE_NAMES},
    )


async def wait_settled(bus, settings, n_invalid) -> None:
    """Poll until the invalid dead letters are all there and no stage has work left."""
    topology = Topology(settings)
    dlq = topology.stream_name(DLQ)
    invalid_subjects = topology.dlq_subject("*", "invalid")
    async with asyncio.timeout(TIMEOUT):
        while True:
            counts = await bus.admin.subject_counts(dlq, invalid_subjects)
            if sum(counts.values()) >= n_invalid:
                busy = 0
                for stage in topology.graph:
                    for view in await bus.admin.consumers(topology.stream_name(stage.channel)):
                        busy += view.state.pending + view.state.ack_pending
                if not busy:
                    return
            await asyncio.sleep(0.1)


def short(subject, data) -> str:
    return f"{subject} {len(data)} bytes {data[:60]!r}"


async def run_scenario(url, items):
    settings = fuzz_settings()
    topology = Topology(settings)
    sent = [(topology.channel_subject(r.channel, r.partition), r.data) for r in items]
    expected = Counter((subject, data) for subject, data in sent
                       if is_invalid(data, subject, topology))  # fmt: skip
    valid = [(ODD_SESSIONS[i % len(ODD_SESSIONS)], f"valid request {i}?") for i in range(20)]

    started = time.monotonic()
    bus = await Bus.connect(url, name="test-fuzz", publish_timeout=settings.publish_timeout)
    client = await Client.connect(settings, url)
    raw = await nats.connect(url, name="test-fuzz-raw")
    group = StageGroup(settings, STAGE_NAMES, topology)
    try:
        await declare(bus, topology)
        group.start(bus)
        js = raw.jetstream()
        raw_sends = [js.publish(subject, data) for subject, data in sent]
        client_sends = [client.publish(text, session) for session, text in valid]
        # Interleaved, so that junk and valid requests share the stages' fetches.
        mixed = [c for pair in zip(raw_sends, client_sends, strict=False) for c in pair]
        mixed += raw_sends[len(client_sends) :] + client_sends[len(raw_sends) :]
        outcomes = await asyncio.gather(*mixed)
        ids = [rid for rid in outcomes if isinstance(rid, str)]
        assert len(ids) == len(valid)
        results = await asyncio.gather(*(client.result(rid, timeout=TIMEOUT) for rid in ids))
        await wait_settled(bus, settings, sum(expected.values()))
        entries = [e async for e in DeadLetterQueue(bus, topology).entries()]
    finally:
        await group.stop()
        await raw.close()
        await client.close()
        await bus.close()
    elapsed = time.monotonic() - started

    invalid = [e for e in entries if e.reason == "invalid"]
    kinds = Counter(r.kind for r in items)
    bad_kinds = Counter(
        r.kind for r, (subject, _) in zip(items, sent, strict=True)
        if is_invalid(r.data, subject, topology)
    )  # fmt: skip
    others = Counter(e.reason for e in entries if e.reason != "invalid")
    n_invalid = sum(expected.values())
    print(
        f"\nfuzz: {len(sent)} raw payloads ({n_invalid} invalid, {len(sent) - n_invalid} "
        f"decodable), {len(invalid)} dead-lettered as invalid, other dead letters "
        f"{dict(others)}; {len(results)}/{len(valid)} valid requests completed; {elapsed:.1f}s"
        "\n  by kind (invalid/all): "
        + ", ".join(f"{k} {bad_kinds[k]}/{n}" for k, n in sorted(kinds.items()))
    )

    got = Counter((e.subject, e.payload) for e in invalid)
    missing, extra = expected - got, got - expected
    assert not missing, f"not dead-lettered: {[short(*k) for k in missing.elements()]}"
    assert not extra, f"unexpected invalid dead letters: {[short(*k) for k in extra.elements()]}"
    for e in invalid:
        what = (e.seq, short(e.subject, e.payload))
        # Entry.error is typed str; tools slice and serialise it.
        assert isinstance(e.error, str), (*what, type(e.error), str(e.error))
        assert e.error.strip() and len(e.error) <= 1024, (*what, e.error)
        assert e.stage == STAGE_OF[e.subject.split(".")[1]], (*what, e.stage)
        assert e.delivered == 1, (*what, e.delivered)
        # The ids are kept wherever the payload is a JSON object that has them well formed.
        # (A header value may lose surrounding whitespace: compare session ids stripped.)
        rid, sid = readable_ids(e.payload)
        assert e.request_id == rid and (e.session_id or "").strip() == (sid or "").strip(), what
        assert e.failed_at > 0, what
    for (session, text), result in zip(valid, results, strict=True):
        assert result.session_id == session
        assert result.output.endswith(f"Question: {text}\nAnswer:")
        assert [hop.stage for hop in result.hops] == STAGE_NAMES


@hypothesis.settings(
    max_examples=8,
    deadline=None,
    database=None,  # nothing written into the working tree
    phases=[Phase.explicit, Phase.generate],  # each example is a whole pipeline run: no shrinking
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(items=st.lists(payloads(), min_size=30, max_size=60))
def test_arbitrary_input_is_dead_lettered_as_invalid(nats_server, items):
    # The server is shared by the examples; each one declares its own prefixed pipeline.
    asyncio.run(run_scenario(nats_server.url, items))
