"""Named, typed entries of an envelope's `data` section: how stages hand things on.

A stage writes what later stages need under a name (`request.with_data(context=[...])`) and a
later stage reads it back with a `DataKey`, which checks its type and says precisely what is
missing or wrong. A new stage adds its own names; the envelope's schema does not change.
docs/PROTOCOL.md lists the names the built-in stages use.
"""

from collections.abc import Iterable, Mapping
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from shared.envelope import Envelope, Usage
from shared.failure import Reject

T = TypeVar("T")
_MISSING: Any = object()


class DataKey(Generic[T]):
    """One name in `data` and the type of its value."""

    def __init__(self, name: str, kind: Any, meaning: str = "") -> None:
        self.name = name
        self.meaning = meaning
        # A model brings its own (strict) config; anything else is checked strictly here.
        model = isinstance(kind, type) and issubclass(kind, BaseModel)
        config = None if model else ConfigDict(strict=True)
        self._adapter: TypeAdapter[T] = TypeAdapter(kind, config=config)

    def read(self, envelope: Envelope, default: T = _MISSING) -> T:
        """The value, checked against the type; Reject when it is missing (without a default)
        or of another type: a request that lacks it cannot be handled by any retry."""
        raw = envelope.data.get(self.name, _MISSING)
        if raw is _MISSING:
            if default is not _MISSING:
                return default
            raise Reject(f"data.{self.name} is missing ({self.meaning or 'no stage set it'})")
        try:
            return self._adapter.validate_python(raw)
        except ValidationError as exc:
            problem = exc.errors(include_url=False)[0]["msg"]
            raise Reject(f"data.{self.name}: {problem}") from None

    def write(self, envelope: Envelope, value: T) -> Envelope:
        """A copy of `envelope` with this key set to `value`.

        Not checked here (readers check what they read): writing is on every stage's path.
        """
        return envelope.model_copy(update={"data": {**envelope.data, self.name: _stored(value)}})


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
    return envelope.model_copy(update={"data": data})


def _stored(value: Any) -> Any:
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
