"""Named, typed entries of an envelope's `data` section: how stages hand things on.

A stage writes what later stages need under a name (`request.with_data(context=[...])`) and a
later stage reads it back with a `DataKey`, which checks its type and says precisely what is
missing or wrong. A new stage adds its own names; the envelope's schema does not change.
docs/PROTOCOL.md lists the names the built-in stages use.
"""

import types
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Generic, Literal, TypeVar, Union, get_args, get_origin

import msgspec
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from shared.envelope import Envelope, Usage, describe_error
from shared.failure import Reject

T = TypeVar("T")
_MISSING: Any = object()


class DataKey(Generic[T]):
    """One name in `data` and the type of its value."""

    def __init__(self, name: str, kind: Any, meaning: str = "") -> None:
        self.name = name
        self.meaning = meaning
        self._kind = kind
        self._adapter: TypeAdapter[T] | None = None
        if not _msgspec_checks(kind):
            # A model brings its own (strict) config; anything else is checked strictly here.
            model = isinstance(kind, type) and issubclass(kind, BaseModel)
            self._adapter = TypeAdapter(kind, config=None if model else ConfigDict(strict=True))

    def read(self, envelope: Envelope, default: T = _MISSING) -> T:
        """The value, checked against the type; Reject when it is missing (without a default)
        or of another type: a request that lacks it cannot be handled by any retry."""
        raw = envelope.data.get(self.name, _MISSING)
        if raw is _MISSING:
            if default is not _MISSING:
                return default
            raise Reject(f"data.{self.name} is missing ({self.meaning or 'no stage set it'})")
        if self._adapter is None:
            try:
                value: T = msgspec.convert(raw, self._kind)
            except msgspec.ValidationError as exc:
                raise Reject(describe_error(exc, root=f"data.{self.name}")) from None
            return value
        try:
            return self._adapter.validate_python(raw)
        except ValidationError as exc:
            problem = exc.errors(include_url=False)[0]["msg"]
            raise Reject(f"data.{self.name}: {problem}") from None

    def write(self, envelope: Envelope, value: T) -> Envelope:
        """A copy of `envelope` with this key set to `value`.

        Not checked here (readers check what they read): writing is on every stage's path.
        """
        return msgspec.structs.replace(envelope, data={**envelope.data, self.name: _stored(value)})


def write_all(
    envelope: Envelope,
    values: "Mapping[DataKey[Any], Any]",
    drop: "Iterable[DataKey[Any]]" = (),
) -> Envelope:
    """A copy of `envelope` with every key of `values` set and the keys in `drop` removed
    (what no later stage reads: a message carries at most two copies of the input, which
    shared.limits counts on); one copy however many keys."""
    data = {**envelope.data, **{key.name: _stored(value) for key, value in values.items()}}
    for key in drop:
        data.pop(key.name, None)
    return msgspec.structs.replace(envelope, data=data)


_PLAIN = (str, int, float, bool, type(None))
_CONTAINERS = (list, dict, tuple, set, frozenset, Union, types.UnionType)


def _msgspec_checks(kind: Any) -> bool:
    """Whether msgspec checks `kind` wholly, strictly ("1" is not 1), and fast: the builtin
    types, msgspec structs, and containers and unions of them. A pydantic model or constraint
    anywhere in it is left to pydantic, which alone knows it."""
    if kind in _PLAIN or kind is Any:
        return True
    if isinstance(kind, type):
        return issubclass(kind, msgspec.Struct)
    origin = get_origin(kind)
    if origin is Literal:
        return True
    if origin is Annotated:
        inner, *extras = get_args(kind)
        return all(isinstance(e, msgspec.Meta) for e in extras) and _msgspec_checks(inner)
    if origin in _CONTAINERS:
        return all(arg is Ellipsis or _msgspec_checks(arg) for arg in get_args(kind))
    return False


def _stored(value: Any) -> Any:
    # Plain JSON values, as a decoded envelope holds them: what a later stage reads is alike
    # whether the value came over the wire or from the same process.
    if isinstance(value, msgspec.Struct):
        return msgspec.to_builtins(value)
    return value.model_dump() if isinstance(value, BaseModel) else value


CONTEXT: DataKey[list[str]] = DataKey(
    "context", list[str], "passages retrieved for the input: set by the rag stage"
)
PROMPT: DataKey[str] = DataKey(
    "prompt", str, "the prompt: set by the assemble stage, removed by the inference stage"
)
COMPLETION: DataKey[str] = DataKey(
    "completion", str, "the model's answer: set by the inference stage, removed by post"
)
OUTPUT: DataKey[str] = DataKey("output", str, "the answer, cleaned: set by the post stage")
USAGE: DataKey[Usage] = DataKey(
    "usage", Usage, "which model answered, and what it took: set by the inference stage"
)
