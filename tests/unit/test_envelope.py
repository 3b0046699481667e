"""The envelope on the wire: round trips and precise errors."""

import re

import msgspec
import orjson
import pytest

from shared.envelope import (
    DeadLettered,
    Envelope,
    Hop,
    Request,
    Result,
    Usage,
    as_json,
    decode,
    encode,
    new_request,
    validated,
)
from shared.errors import InvalidMessage


def test_round_trip_keeps_every_field():
    request = new_request("héllo ✓", "sess.with dots*>", metadata={"k": 1, "b": True, "n": None})
    env = Envelope(**msgspec.structs.asdict(request)).with_data(
        context=["a"], prompt="p", anything={"nested": [1, 2.5, None, "x"]}
    )
    env.hops.append(Hop(stage="rag", instance="i", received=1.0, done=2.0))
    assert decode(encode(env), Envelope, 10_000) == env
    # A request is an envelope that no stage has touched yet.
    assert decode(encode(request), Envelope, 10_000) == Envelope(**msgspec.structs.asdict(request))


def test_encoded_form_is_json_with_version_and_only_the_request_fields():
    raw = orjson.loads(encode(new_request("q", "s", request_id="r-1")))
    assert raw["v"] == 1
    assert raw["request_id"] == "r-1"
    assert raw["session_id"] == "s"
    # defaults are left out: no metadata, deadline or stream here
    assert set(raw) == {"v", "request_id", "session_id", "input", "created_at"}


def test_encoding_is_compact_and_refuses_what_json_cannot_carry():
    env = Envelope(request_id="r", session_id="s", input="é\u2028\x01", created_at=1.5,
                   data={"n": [1, 2.5e-7, None, True], "k": {"x": "y"}})  # fmt: skip
    # compact, UTF-8 as it is, control characters escaped: as orjson writes the same object
    fields = {"v": 1, **msgspec.structs.asdict(env)}
    del fields["metadata"], fields["deadline"], fields["stream"], fields["hops"]  # defaults
    assert encode(env) == orjson.dumps(fields)
    with pytest.raises(TypeError, match="not JSON"):
        encode(env.with_data(when=object()))


def test_a_field_added_after_the_first_release_is_sent_only_when_set():
    # A stage of the first release refuses unknown fields; leaving `stream: false` out keeps
    # a newer client's plain requests acceptable to it during a rolling upgrade.
    assert "stream" not in orjson.loads(encode(new_request("q", "s")))
    streamed = new_request("q", "s", stream=True)
    assert orjson.loads(encode(streamed))["stream"] is True
    assert decode(encode(streamed), Request, 10_000) == streamed


def test_with_data_sets_and_removes_keys_without_touching_the_original():
    env = Envelope(request_id="r", session_id="s", input="x", created_at=0.0)
    added = env.with_data(a=1, b=[2])
    assert (env.data, added.data) == ({}, {"a": 1, "b": [2]})
    assert added.with_data(a=None).data == {"b": [2]}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'{"v": 2}', "unsupported envelope version 2"),
        (b'{"request_id": "a"}', "unsupported envelope version None"),
        (
            b'{"v":1,"request_id":"a","session_id":"s","input":5,"created_at":1}',
            "input: expected `str`, got `int`",
        ),
        (b'{"v":1,"request_id":"a b","session_id":"s","input":"x","created_at":1}', "request_id"),
        (b'{"v":1,"request_id":"a","input":"x","created_at":1}', "session_id: missing"),
        (
            b'{"v":1,"request_id":"a","session_id":"s","input":"x","created_at":1,"extra":1}',
            "extra: unknown field",
        ),
        (
            b'{"v":1,"request_id":"a","session_id":"s","input":"x","created_at":"1"}',
            "created_at: expected `float`, got `str`",
        ),
        # what JSON cannot say, and faults inside nested records
        (b'{"v":1,"request_id":"a","session_id":"s","input":"x","created_at":NaN}', "not valid"),
        (b'{"v":1,"request_id":"a","session_id":"s","input":"x","created_at":1e400}', "not valid"),
        (b'{"v":1,"request_id":"a","session_id":"s","input":"\\ud800","created_at":1}', "valid"),
        (
            b'{"v":1,"request_id":"a","session_id":"s","input":"x","created_at":1,'
            b'"hops":[{"stage":"s","instance":"i","received":1}]}',
            "hops[0].done: missing",
        ),
        (
            b'{"v":1,"request_id":"a","session_id":"s","input":"x","created_at":1,'
            b'"hops":[{"stage":"s","instance":"i","received":1,"done":2,"x":0}]}',
            "hops[0].x: unknown field",
        ),
    ],
)
def test_bad_messages_name_the_problem(data, expected):
    with pytest.raises(InvalidMessage, match=re.escape(expected)):
        decode(data, Envelope, 10_000)


def test_size_limit_is_checked_before_parsing():
    data = encode(new_request("x" * 2000, "s"))
    with pytest.raises(InvalidMessage, match=r"over the limit of 1000"):
        decode(data, Envelope, 1000)


def test_result_round_trip():
    result = Result(
        request_id="r", session_id="s", output="o", created_at=1.0, completed_at=2.0, hops=[]
    )
    assert decode(encode(result), Result, 1000) == result


def test_new_request_rejects_bad_request_id():
    with pytest.raises(InvalidMessage, match="request_id"):
        new_request("q", "s", request_id="has.dots")


@pytest.mark.parametrize("version", [b"true", b'"1"', b"1.5", b"2"])
def test_version_must_be_the_integer_one(version):
    data = b'{"v":' + version + b',"request_id":"a","session_id":"s","input":"x","created_at":1}'
    with pytest.raises(InvalidMessage, match="unsupported envelope version"):
        decode(data, Envelope, 10_000)


def test_version_one_point_zero_is_the_integer_one_as_json_schema_says():
    data = b'{"v":1.0,"request_id":"a","session_id":"s","input":"x","created_at":1.0}'
    assert decode(data, Request, 10_000).request_id == "a"


def test_the_schemas_require_v_as_the_decoder_does():
    from shared.schema import MODELS

    for name, model in MODELS.items():
        assert "v" in msgspec.json.schema(model)["$defs"][model.__name__]["required"], name
    missing = b'{"request_id":"a","session_id":"s","input":"x","created_at":1.0}'
    with pytest.raises(InvalidMessage, match="version"):
        decode(missing, Request, 10_000)


def test_messages_in_another_layout_are_checked_as_fully():
    # A client in another language may order keys otherwise and add spaces.
    data = b'{ "request_id": "a", "v": 1, "session_id": "s", "input": "x", "created_at": 1 }'
    assert decode(data, Request, 10_000).session_id == "s"
    for bad, problem in [
        (b'{"session_id": "s", "v": 1, "request_id": "a", "input": 5, "created_at": 1}', "input"),
        (b'{"session_id": "", "v": 1, "request_id": "a", "input": "x", "created_at": 1}',
         "session_id: expected `str` of length >= 1"),
    ]:  # fmt: skip
        with pytest.raises(InvalidMessage, match=problem):
            decode(bad, Request, 10_000)


def test_an_outcome_and_a_result_carry_every_field_even_at_its_default():
    # Clients read these: the documented fields are there, null where unknown.
    result = Result(request_id="r", session_id="s", output="o", created_at=1.0,
                    completed_at=2.0, usage=Usage(model="m"))  # fmt: skip
    raw = orjson.loads(encode(result))
    assert raw["metadata"] == {} and raw["hops"] == []
    assert raw["usage"]["prompt_tokens"] is None and raw["usage"]["fallback"] is False
    outcome = DeadLettered(request_id="r", status="failed", stage="x", error="e",
                           dead_letter_seq=1, at=1.0)  # fmt: skip
    assert orjson.loads(encode(outcome))["session_id"] is None
    assert orjson.loads(as_json(outcome)) == orjson.loads(encode(outcome))


def test_validated_checks_what_python_code_built():
    assert validated({"model": "m", "prompt_tokens": 3}, Usage) == Usage(model="m", prompt_tokens=3)
    wrong = re.escape("prompt_tokens: expected `int | null`, got `str`")
    with pytest.raises(InvalidMessage, match=wrong):
        validated({"model": "m", "prompt_tokens": "3"}, Usage)
    built = Request(request_id="has.dots", session_id="s", input="x", created_at=1.0)
    with pytest.raises(InvalidMessage, match="request_id"):
        validated(built, Request)


def test_a_request_id_with_a_last_newline_is_refused():
    # Python's `$` matches before a last newline; the id would break the result's subject.
    data = b'{"v":1,"request_id":"abc\\n","session_id":"s","input":"x","created_at":1}'
    with pytest.raises(InvalidMessage, match="request_id"):
        decode(data, Request, 10_000)
    with pytest.raises(InvalidMessage, match="request_id"):
        new_request("q", "s", request_id="abc\n")


def test_data_nested_too_deeply_is_invalid_not_a_crash():
    deep = b"[" * 5000 + b"]" * 5000
    data = b'{"v":1,"request_id":"a","session_id":"s","input":"x","created_at":1,"data":{"k":'
    with pytest.raises(InvalidMessage, match="depth"):
        decode(data + deep + b"}}", Envelope, 100_000)
    nested: list[object] = []
    for _ in range(5000):
        nested = [nested]
    env = Envelope(request_id="a", session_id="s", input="x", created_at=1.0)
    with pytest.raises(TypeError, match="nested too deeply"):
        encode(env.with_data(k=nested))


def test_validated_refuses_values_json_would_only_carry_as_text():
    built = Request(request_id="a", session_id="s", input="x", created_at=1.0,
                    metadata={"raw": b"\x00\x01"})  # fmt: skip
    with pytest.raises(InvalidMessage, match="got `bytes`"):
        validated(built, Request)
    keyed = {"request_id": "a", "session_id": "s", "input": "x", "created_at": 1.0,
             "metadata": {1: "x"}}  # fmt: skip
    with pytest.raises(InvalidMessage, match=re.escape("metadata (a key): expected `str`")):
        validated(keyed, Request)
