"""Data keys read what earlier stages wrote, checked against their types."""

from typing import Annotated

import pytest
from pydantic import BaseModel, Field

from shared.data import CONTEXT, USAGE, DataKey
from shared.envelope import Envelope, Usage
from shared.failure import Reject


class Note(BaseModel):
    text: str


def envelope(**data: object) -> Envelope:
    return Envelope(request_id="r", session_id="s", input="x", created_at=1.0).with_data(**data)


def test_plain_types_and_structs_are_checked_strictly():
    assert CONTEXT.read(envelope(context=["a", "b"])) == ["a", "b"]
    with pytest.raises(Reject, match=r"data\.context\[1\]: expected `str`, got `int`"):
        CONTEXT.read(envelope(context=["a", 1]))
    written = USAGE.write(envelope(), Usage(model="m", prompt_tokens=3))
    assert written.data["usage"]["prompt_tokens"] == 3  # stored as plain JSON
    assert USAGE.read(written) == Usage(model="m", prompt_tokens=3)
    with pytest.raises(Reject, match=r"data\.usage\.prompt_tokens: expected `int \| null`"):
        USAGE.read(envelope(usage={"model": "m", "prompt_tokens": "3"}))


def test_pydantic_models_and_constraints_are_still_checked_by_pydantic():
    notes: DataKey[list[Note]] = DataKey("notes", list[Note])
    assert notes.read(envelope(notes=[{"text": "a"}])) == [Note(text="a")]
    count: DataKey[int] = DataKey("count", Annotated[int, Field(ge=0)])
    assert count.read(envelope(count=3)) == 3
    with pytest.raises(Reject, match=r"data\.count: Input should be greater than or equal to 0"):
        count.read(envelope(count=-5))
    with pytest.raises(Reject, match=r"data\.count: Input should be a valid integer"):
        count.read(envelope(count="3"))  # strict, as plain types are
