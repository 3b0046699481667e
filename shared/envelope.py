"""The messages on the wire: pydantic models, JSON via orjson, versioned by a `"v"` field.

A client publishes a `Request`. Between stages it travels as an `Envelope`: the request's
fields, a `data` section where stages leave what later stages read (by name: shared.data),
and the `hops` the runtime appends, one per stage. A last stage turns the envelope into a
`Result`. JSON Schemas of these models are under docs/schema/.
"""

import re
import time
import uuid
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticSerializationError

from shared.errors import InvalidMessage

ENVELOPE_VERSION = 1
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
SESSION_ID_MAX = 1024

MetaValue = str | int | float | bool | None
Metadata = Annotated[dict[str, MetaValue], Field(max_length=64)]


def _v_is_required(schema: dict[str, Any], model: type[BaseModel]) -> None:
    # Python fills `v` in; on the wire it is required (decode refuses a message without it).
    if "v" in model.model_fields:
        schema["required"] = ["v", *schema.get("required", [])]


class _Wire(BaseModel):
    # strict: "1" is not 1 and 1 is not "1"; unknown fields are an error, not silently dropped.
    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra=_v_is_required)


M = TypeVar("M", bound=_Wire)


class Hop(_Wire):
    """One stage's handling of a request: who handled it and when (unix seconds)."""

    stage: str
    instance: str
    received: float
    done: float


class Request(_Wire):
    """A request as a client sends it."""

    v: Literal[1] = ENVELOPE_VERSION
    request_id: str = Field(pattern=REQUEST_ID_PATTERN)
    session_id: str = Field(min_length=1, max_length=SESSION_ID_MAX)
    input: str
    metadata: Metadata = Field(default_factory=dict)
    created_at: float
    deadline: float | None = None
    stream: bool = False
    """Publish the answer's tokens as they are generated, to `<prefix>.tokens.<request_id>`."""


class Envelope(Request):
    """A request as it travels between stages."""

    data: dict[str, Any] = Field(default_factory=dict, max_length=64)
    """What stages leave for later stages, by name (shared.data lists the built-in ones).
    Values are any JSON; a stage that adds one changes no schema."""
    hops: list[Hop] = Field(default_factory=list)

    def with_data(self, **values: Any) -> "Envelope":
        """A copy with `values` set in `data` (None removes a key)."""
        data = {**self.data, **values}
        for key, value in values.items():
            if value is None:
                del data[key]
        return self.model_copy(update={"data": data})


class Usage(_Wire):
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


class Result(_Wire):
    """The final answer to a request, as stored in the results stream."""

    v: Literal[1] = ENVELOPE_VERSION
    request_id: str = Field(pattern=REQUEST_ID_PATTERN)
    session_id: str
    output: str
    metadata: Metadata = Field(default_factory=dict)
    created_at: float
    completed_at: float
    hops: list[Hop] = Field(default_factory=list)
    usage: Usage | None = None
    """Set when a model answered (the inference stage records it)."""


class DeadLettered(_Wire):
    """How a request ended when it did not complete: stored where its result would be.

    A stage that dead-letters a request whose id it could read publishes this to the
    request's result subject, after the dead-letter entry is stored. A replay that then
    completes replaces it with the result (one message per result subject).
    """

    v: Literal[1] = ENVELOPE_VERSION
    request_id: str = Field(pattern=REQUEST_ID_PATTERN)
    session_id: str | None = None
    status: Literal["backpressure", "expired", "invalid", "failed"]
    """The dead-letter reason."""
    stage: str
    """The stage that dead-lettered it."""
    error: str
    dead_letter_seq: int = Field(ge=1)
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
    try:
        return Request(
            request_id=request_id or new_request_id(),
            session_id=session_id,
            input=text,
            metadata=metadata or {},
            created_at=time.time(),
            deadline=deadline,
            stream=stream,
        )
    except ValidationError as exc:
        raise InvalidMessage(describe_validation_error(exc)) from None


ADDED_FIELDS = {"stream": False}
"""Fields added to version 1 after its first release, with their defaults. While a field holds
its default it is left out of the JSON, so stages of an earlier release (which refuse unknown
fields) still accept the message: mixed versions work during a rolling upgrade."""


_ADDED = tuple(ADDED_FIELDS.items())


def encode(model: BaseModel) -> bytes:
    """Serialise a wire model to compact JSON bytes; TypeError for a value JSON cannot carry
    (in `data`, say)."""
    # The serializer itself, straight to JSON: model_dump's wrapper, and a dict for orjson to
    # write, cost more than the work on a stage's small messages. The bytes are orjson's.
    left_out = None  # a plain loop: a comprehension here costs more than the check itself
    for key, default in _ADDED:
        if getattr(model, key, None) is default:
            left_out = {key} if left_out is None else {*left_out, key}
    try:
        return model.__pydantic_serializer__.to_json(model, exclude=left_out)
    except PydanticSerializationError as exc:
        raise TypeError(f"not JSON: {exc}") from None


def decode(data: bytes, model: type[M], max_bytes: int) -> M:
    """Parse `data` into `model`, raising InvalidMessage with a precise reason on any fault."""
    if len(data) > max_bytes:
        raise InvalidMessage(f"message is {len(data)} bytes, over the limit of {max_bytes}")
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
    try:
        return model.__pydantic_validator__.validate_python(raw)  # model_validate, less a frame
    except ValidationError as exc:
        raise InvalidMessage(describe_validation_error(exc)) from None


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


def describe_validation_error(exc: ValidationError, limit: int = 5) -> str:
    """Render pydantic errors as `field: problem` pairs, short enough for a header."""
    parts = []
    for err in exc.errors()[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "(message)"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)
