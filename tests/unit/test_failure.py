"""The failure decision as a table: error x delivery count -> retry or dead letter."""

import pytest

from shared.errors import InvalidMessage, Overloaded
from shared.failure import Abandoned, DeadLetter, Expired, Reason, Reject, Retry, decide

BACKOFF = [1.0, 5.0, 30.0]


@pytest.mark.parametrize(
    ("error", "delivered", "expected"),
    [
        (RuntimeError("boom"), 1, Retry(1.0)),
        (RuntimeError("boom"), 2, Retry(5.0)),
        (RuntimeError("boom"), 3, Retry(30.0)),
        (RuntimeError("boom"), 4, Retry(30.0)),
        (RuntimeError("boom"), 5, DeadLetter(Reason.FAILED, "RuntimeError: boom")),
        (RuntimeError(), 5, DeadLetter(Reason.FAILED, "RuntimeError")),
        (InvalidMessage("bad"), 1, DeadLetter(Reason.INVALID, "bad")),
        (Overloaded("orch.post.1"), 1, DeadLetter(Reason.BACKPRESSURE, None)),
        (Expired("late"), 1, DeadLetter(Reason.EXPIRED, "late")),
        (Reject("never"), 1, DeadLetter(Reason.FAILED, "Reject: never")),
        (Abandoned("died"), 6, DeadLetter(Reason.FAILED, "Abandoned: died")),
    ],
)
def test_decide(error, delivered, expected):
    got = decide(error, delivered, max_deliver=5, backoff=BACKOFF)
    if isinstance(expected, DeadLetter) and expected.error is None:
        assert isinstance(got, DeadLetter)
        assert got.reason == expected.reason
        assert "orch.post.1" in got.error
    else:
        assert got == expected


def test_no_backoff_means_immediate_retry():
    assert decide(RuntimeError(), 1, max_deliver=3, backoff=[]) == Retry(0.0)


def test_errors_are_one_line():
    got = decide(RuntimeError("a\nb\r\nc"), 1, max_deliver=1, backoff=[])
    assert got == DeadLetter(Reason.FAILED, "RuntimeError: a b  c")
