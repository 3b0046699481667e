"""The messages on the wire: pydantic models, JSON via orjson, versioned by a `"v"` field.

A client publishes an `Envelope` with the request fields; each stage fills in its part
(`context`, `prompt`, `tokens`, `output`) and the runtime appends a `Hop`. The last stage turns
the envelope into a `Result`. JSON Schemas of these models are under docs/schema/.
"""

import time
import uuid
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import InvalidMessage

ENVELOPE_VERSION = 1
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"

MetaValue = str | int | float | bool | None
Metadata = Annotated[dict[str, MetaValue], Field(max_length=64)]


class _Wire(BaseModel):
    # strict: "1" is not 1 and 1 is not "1"; unknown fields are an error, not silently dropped.
    model_config = ConfigDict(strict=True, extra="forbid")


M = TypeVar("M", bound=_Wire)


class Hop(_Wire):
    """One stage's handling of a request: who handled it and when (unix seconds)."""

    stage: str
    instance: str
    received: float
    done: float


class Envelope(_Wire):
    """A request as it travels between stages."""

    v: Literal[1] = ENVELOPE_VERSION
    request_id: str = Field(pattern=REQUEST_ID_PATTERN)
    session_id: str = Field(min_length=1, max_length=1024)
    input: str
    metadata: Metadata = Field(default_factory=dict)
    created_at: float
    deadline: float | None = None
    context: list[str] = Field(default_factory=list)
    prompt: str | None = None
    tokens: list[str] = Field(default_factory=list)
    output: str | None = None
    hops: list[Hop] = Field(default_factory=list)


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
) -> Envelope:
    """Build a validated request envelope, generating the request id when none is given."""
    try:
        return Envelope(
            request_id=request_id or new_request_id(),
            session_id=session_id,
            input=text,
            metadata=metadata or {},
            created_at=time.time(),
            deadline=deadline,
        )
    except ValidationError as exc:
        raise InvalidMessage(describe_validation_error(exc)) from None


def encode(model: BaseModel) -> bytes:
    """Serialise a wire model to compact JSON bytes."""
    return orjson.dumps(model.model_dump())


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
    if type(version) is not int or version != ENVELOPE_VERSION:  # true and 1.0 are not 1
        raise InvalidMessage(
            f"v: unsupported envelope version {version!r}; this stage speaks {ENVELOPE_VERSION}"
        )
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise InvalidMessage(describe_validation_error(exc)) from None


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
