"""The messages on the wire: msgspec structs, JSON, versioned by a `"v"` field.

A client publishes a `Request`. Between stages it travels as an `Envelope`: the request's
fields, a `data` section where stages leave what later stages read (by name: shared.data),
and the `hops` the runtime appends, one per stage. A last stage turns the envelope into a
`Result`. JSON Schemas of these models are under docs/schema/.

Structs check their fields when they are decoded (`decode`) or converted (`validated`), not
when Python code builds them: a stage builds its output from values it has already checked.
"""

import re
import time
import uuid
from datetime import date, datetime, timedelta
from datetime import time as dt_time
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID

import msgspec
import orjson
from msgspec import Meta

from shared.errors import InvalidMessage

ENVELOPE_VERSION = 1
# `(?!\n)`: in Python's re, whose search msgspec uses, `$` also matches before a last newline.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$(?!\n)"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
SESSION_ID_MAX = 1024

MetaValue = str | int | float | bool | None
Metadata = Annotated[dict[str, MetaValue], Meta(max_length=64)]
RequestId = Annotated[str, Meta(pattern=REQUEST_ID_PATTERN)]


class _Part(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # Unknown fields are an error, not silently dropped; types are strict ("1" is not 1).
    pass


class _Wire(_Part, kw_only=True, tag_field="v", tag=ENVELOPE_VERSION):
    # A message of its own: `"v": 1` is written first in every one (decode counts on that).
    pass


M = TypeVar("M", bound=_Part)
W = TypeVar("W", bound=_Wire)


class Hop(_Part, kw_only=True):
    """One stage's handling of a request: who handled it and when (unix seconds)."""

    stage: str
    instance: str
    received: float
    done: float


# Fields at their defaults are left out of a request's JSON: a stage of an earlier release,
# which refuses fields it does not know, still accepts a request that does not use a newer one
# (`stream`, say), so mixed versions work during a rolling upgrade.
class Request(_Wire, kw_only=True, omit_defaults=True):
    """A request as a client sends it."""

    request_id: RequestId
    session_id: Annotated[str, Meta(min_length=1, max_length=SESSION_ID_MAX)]
    input: str
    metadata: Metadata = {}
    created_at: float
    deadline: float | None = None
    stream: bool = False
    """Publish the answer's tokens as they are generated, to `<prefix>.tokens.<request_id>`."""


class Envelope(Request, kw_only=True, omit_defaults=True):
    """A request as it travels between stages."""

    data: Annotated[dict[str, Any], Meta(max_length=64)] = {}
    """What stages leave for later stages, by name (shared.data lists the built-in ones).
    Values are any JSON; a stage that adds one changes no schema."""
    hops: list[Hop] = []

    def with_data(self, **values: Any) -> "Envelope":
        """A copy with `values` set in `data` (None removes a key)."""
        data = {**self.data, **values}
        for key, value in values.items():
            if value is None:
                del data[key]
        return msgspec.structs.replace(self, data=data)


class Usage(_Part, kw_only=True):
    """Which model answered a request, and what it took."""

    model: str
    """The model as the backend named it."""
    pool: str | None = None
    """The configured model (pool) that answered."""
    fallback: bool = False
    """Whether it answered because the one chosen first failed."""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    """Milliseconds from the call to the model until its first token."""
    tokens_per_second: float | None = None
    """Completion tokens per second after the first one."""


class Result(_Wire, kw_only=True):
    """The final answer to a request, as stored in the results stream."""

    request_id: RequestId
    session_id: str
    output: str
    metadata: Metadata = {}
    created_at: float
    completed_at: float
    hops: list[Hop] = []
    usage: Usage | None = None
    """Set when a model answered (the inference stage records it)."""


class DeadLettered(_Wire, kw_only=True):
    """How a request ended when it did not complete: stored where its result would be.

    A stage that dead-letters a request whose id it could read publishes this to the
    request's result subject, after the dead-letter entry is stored. A replay that then
    completes replaces it with the result (one message per result subject).
    """

    request_id: RequestId
    session_id: str | None = None
    status: Literal["backpressure", "expired", "invalid", "failed"]
    """The dead-letter reason."""
    stage: str
    """The stage that dead-lettered it."""
    error: str
    dead_letter_seq: Annotated[int, Meta(ge=1)]
    """The dead-letter entry's sequence: `orchestrator dlq show <seq>`."""
    at: float
    """When (unix seconds)."""


def new_request_id() -> str:
    """Return a fresh request id (32 hex characters)."""
    return uuid.uuid4().hex


def new_request(
    text: str,
    session_id: str,
    *,
    metadata: dict[str, MetaValue] | None = None,
    request_id: str | None = None,
    deadline: float | None = None,
    stream: bool = False,
) -> Request:
    """Build a validated request, generating the request id when none is given."""
    fields = {
        "request_id": request_id or new_request_id(),
        "session_id": session_id,
        "input": text,
        "metadata": metadata or {},
        "created_at": time.time(),
        "deadline": deadline,
        "stream": stream,
    }
    return validated(fields, Request)


def validated(value: Any, model: type[M]) -> M:
    """`value` (a dict, or a struct) checked and converted to `model`; InvalidMessage with the
    problem when it does not fit."""
    if isinstance(value, msgspec.Struct):
        value = msgspec.to_builtins(value, builtin_types=_NOT_JSON)  # left for convert to refuse
    try:
        return msgspec.convert(value, model)
    except msgspec.ValidationError as exc:
        raise InvalidMessage(describe_error(exc)) from None
    except RecursionError:
        raise InvalidMessage("nested too deeply") from None


_NOT_JSON = (bytes, bytearray, memoryview, datetime, date, dt_time, timedelta, UUID, Decimal)
_ENCODER = msgspec.json.Encoder()
_DECODERS: dict[type[Any], "msgspec.json.Decoder[Any]"] = {}
_VERSIONED = b'{"v":1,'  # how every message `encode` writes starts


def encode(model: msgspec.Struct) -> bytes:
    """Serialise a wire model to compact JSON bytes; TypeError for a value JSON cannot carry
    (in `data`, say)."""
    try:
        return _ENCODER.encode(model)
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(f"not JSON: {exc}") from None
    except RecursionError:
        raise TypeError("not JSON: nested too deeply") from None


def decode(data: bytes, model: type[W], max_bytes: int) -> W:
    """Parse `data` into `model`, raising InvalidMessage with a precise reason on any fault."""
    if len(data) > max_bytes:
        raise InvalidMessage(f"message is {len(data)} bytes, over the limit of {max_bytes}")
    if data[:7] == _VERSIONED:
        # Written by `encode` (or alike): one pass parses and checks it. msgspec takes a
        # missing tag for the default, so only a message that starts with it comes this way.
        decoder = _DECODERS.get(model)
        if decoder is None:
            decoder = _DECODERS[model] = msgspec.json.Decoder(model)
        try:
            return decoder.decode(data)
        except (msgspec.MsgspecError, RecursionError):
            pass  # the slower path below says precisely what is wrong
    return _decode_checked(data, model)


def _decode_checked(data: bytes, model: type[W]) -> W:
    """`decode` for any JSON object (keys in any order, spaces), naming the first fault."""
    try:
        raw: Any = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage(f"not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidMessage(f"expected a JSON object, got {type(raw).__name__}")
    version = raw.get("v")
    if type(version) is float and version == ENVELOPE_VERSION:  # JSON's 1.0 is the integer 1
        raw["v"] = version = ENVELOPE_VERSION
    if type(version) is not int or version != ENVELOPE_VERSION:  # true and "1" are not 1
        raise InvalidMessage(
            f"v: unsupported envelope version {version!r}; this stage speaks {ENVELOPE_VERSION}"
        )
    return validated(raw, model)


def decode_answer(data: bytes, max_bytes: int) -> "Result | DeadLettered":
    """Parse a message of a result subject: a Result, or a DeadLettered outcome (which has a
    `status` and no `output`)."""
    try:
        raw: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        raw = None
    if isinstance(raw, dict) and "status" in raw and "output" not in raw:
        return decode(data, DeadLettered, max_bytes)
    return decode(data, Result, max_bytes)


def peek_ids(data: bytes) -> tuple[str | None, str | None]:
    """The request and session ids of a message that failed to decode, where it has them
    (valid JSON, an object, a well-formed request id, a session id of at most SESSION_ID_MAX
    characters); None for each it lacks."""
    try:
        raw: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(raw, dict):
        return None, None
    rid, sid = raw.get("request_id"), raw.get("session_id")
    well_formed = isinstance(rid, str) and _REQUEST_ID.fullmatch(rid) is not None
    sid_ok = isinstance(sid, str) and 0 < len(sid) <= SESSION_ID_MAX
    return (rid if well_formed else None), (sid if sid_ok else None)


_WHERE = re.compile(
    r"(?P<problem>.*?)(?: - at (?P<key>`key` in )?`\$\.?(?P<path>[^`]*)`)?", re.DOTALL
)
_FIELD = re.compile(r"Object (?P<what>contains unknown|missing required) field `(?P<name>.*)`")


def describe_error(exc: msgspec.ValidationError, root: str = "") -> str:
    """Render a validation error as `field: problem`, short enough for a header; `root` names
    where the checked value sits."""
    found = _WHERE.fullmatch(str(exc))
    assert found is not None  # the pattern matches any text
    problem, path = found["problem"], found["path"] or ""
    field = _FIELD.fullmatch(problem)
    if field is not None:
        path = f"{path}.{field['name']}" if path else field["name"]
        problem = "unknown field" if field["what"] == "contains unknown" else "missing"
    if root:
        path = f"{root}{path}" if path.startswith("[") or not path else f"{root}.{path}"
    if found["key"]:
        path = f"{path or '(message)'} (a key)"
    return f"{path or '(message)'}: {problem[:1].lower()}{problem[1:]}"


def as_json(model: msgspec.Struct) -> str:
    """The model as indented JSON text, for people to read."""
    return msgspec.json.format(encode(model), indent=2).decode()
