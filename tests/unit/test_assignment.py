"""Partition assignment: complete, balanced, deterministic, and moving only what must move."""

import math
import random

import pytest

from shared.assignment import assign, owner_of, rebalance


def check_balanced(owned: dict[str, list[int]], partitions: int) -> None:
    flat = sorted(p for ps in owned.values() for p in ps)
    assert flat == list(range(partitions))
    n = len(owned)
    assert max(len(ps) for ps in owned.values()) <= math.ceil(partitions / n)
    assert min(len(ps) for ps in owned.values()) >= partitions // n


@pytest.mark.parametrize("partitions", [1, 7, 8, 32, 64])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 9])
def test_every_partition_has_one_owner_and_load_is_bounded(partitions, n):
    check_balanced(assign("inference", partitions, [f"inst-{i}" for i in range(n)]), partitions)


def test_deterministic_regardless_of_order():
    assert assign("post", 16, ["c", "a", "b"]) == assign("post", 16, ["b", "c", "a"])


def moved(before: dict, after: dict) -> set[int]:
    a, b = owner_of(before), owner_of(after)
    return {p for p in a if p in b and a[p] != b[p]}


@pytest.mark.parametrize("partitions", [8, 64])
@pytest.mark.parametrize("seed", range(5))
def test_leave_moves_only_the_leavers_partitions(partitions, seed):
    rng = random.Random(seed)
    members = [f"m{rng.randrange(10**6)}" for _ in range(3)]
    before = assign("rag", partitions, members)
    gone = members[seed % 3]
    after = rebalance("rag", partitions, {m: before[m] for m in members if m != gone})
    check_balanced(after, partitions)
    for m in after:  # survivors keep everything they had
        assert set(before[m]) <= set(after[m])


@pytest.mark.parametrize("partitions", [8, 64])
@pytest.mark.parametrize("seed", range(5))
def test_join_takes_exactly_a_fair_share(partitions, seed):
    rng = random.Random(seed)
    members = [f"m{rng.randrange(10**6)}" for _ in range(3)]
    before = assign("rag", partitions, members)
    after = rebalance("rag", partitions, {**before, "new": []})
    check_balanced(after, partitions)
    # Only the newcomer gains; what moves is exactly what it takes.
    assert moved(before, after) == set(after["new"])
    assert len(after["new"]) >= partitions // 4


def test_duplicate_claims_are_resolved_and_result_is_stable():
    first = assign("post", 8, ["a", "b"])
    clash = rebalance("post", 8, {"a": range(8), "b": range(8)})
    check_balanced(clash, 8)
    assert rebalance("post", 8, first) == first  # a fixed point: nothing moves when stable


def test_no_members_no_owners():
    assert assign("rag", 8, []) == {}
