"""Partition function: FNV-1a 32 and the published test vectors."""

import re
from pathlib import Path

import pytest

from shared.partition import fnv1a32, partition_of

DOC = Path(__file__).parents[2] / "docs" / "PROTOCOL.md"


def test_fnv1a32_reference_values():
    # Reference values of the FNV-1a 32-bit specification.
    assert fnv1a32(b"") == 0x811C9DC5
    assert fnv1a32(b"a") == 0xE40C292C
    assert fnv1a32(b"foobar") == 0xBF9CF968


def test_partition_is_in_range_and_stable():
    for n in (1, 2, 7, 64):
        for sid in ("a", "b.c", "ü", "*", ">", " "):
            p = partition_of(sid, n)
            assert 0 <= p < n
            assert p == partition_of(sid, n)


def test_partition_rejects_zero():
    with pytest.raises(ValueError):
        partition_of("s", 0)


def _doc_vectors() -> list[tuple[str, int, int, int]]:
    rows = re.findall(
        r"^\| `(?P<sid>[^`]*)` \| `0x(?P<h>[0-9a-f]{8})` \| (?P<n>\d+) \| (?P<p>\d+) \|$",
        DOC.read_text(encoding="utf-8"),
        flags=re.MULTILINE,
    )
    return [(sid, int(h, 16), int(n), int(p)) for sid, h, n, p in rows]


def test_protocol_doc_vectors_match_the_implementation():
    vectors = _doc_vectors()
    assert len(vectors) >= 8, "docs/PROTOCOL.md lost its partition test vectors"
    for sid, h, n, p in vectors:
        assert fnv1a32(sid.encode()) == h, sid
        assert partition_of(sid, n) == p, sid
