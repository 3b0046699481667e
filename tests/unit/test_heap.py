"""heap.settle: start-up objects leave the collector's work, young collections space out."""

import gc
import weakref
from collections.abc import Iterator

import pytest

from shared.app import heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settle_freezes_what_exists_and_spaces_young_collections(restored_gc: None) -> None:
    before = gc.get_threshold()
    kept = [object() for _ in range(10)], {"a": [1, 2]}
    heap.settle()
    assert gc.get_freeze_count() > 1000  # the modules, classes and functions loaded so far
    assert gc.get_threshold() == (heap.YOUNG_THRESHOLD, before[1], before[2])
    assert kept


def test_cycles_made_after_settling_are_still_collected(restored_gc: None) -> None:
    heap.settle()

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # type: ignore[attr-defined]
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None
