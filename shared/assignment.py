"""Which live instance of a stage owns which partition.

Every instance computes the same answer from the same shared state (the live members and
the partitions each announces it owns), with no coordinator:

1. members keep the partitions they hold (a partition claimed twice stays with the claimant
   that weighs more for it);
2. members above their fair share give up their lowest-weight partitions: loads end up as
   floor(P/N) or ceil(P/N), with exactly P mod N members at the ceiling;
3. partitions nobody holds go, one by one, to the member under its share that weighs most for
   it (highest random weight, i.e. rendezvous hashing).

So a member that leaves frees only its own partitions, a member that joins takes only its
fair share from the others, and nothing else moves. Started from nothing, it is rendezvous
hashing with bounded load.
"""

import hashlib
from collections.abc import Iterable, Mapping


def weight(stage: str, partition: int, member: str) -> int:
    """The rendezvous weight of `member` for one partition of `stage`."""
    digest = hashlib.blake2b(f"{stage}\0{partition}\0{member}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big")


def rebalance(
    stage: str, partitions: int, current: Mapping[str, Iterable[int]]
) -> dict[str, list[int]]:
    """The next assignment for the live members in `current` (member -> partitions held)."""
    live = sorted(current)
    owned: dict[str, set[int]] = {m: set() for m in live}
    if not live:
        return {}

    def w(p: int, m: str) -> int:
        return weight(stage, p, m)

    holder: dict[int, str] = {}
    for m in live:
        for p in current[m]:
            if 0 <= p < partitions and (p not in holder or w(p, m) > w(p, holder[p])):
                holder[p] = m
    for p, m in holder.items():
        owned[m].add(p)

    floor, extra = divmod(partitions, len(live))
    # Members may stay at floor+1 only up to `extra` of them: those already there keep it
    # in order of how much they weigh for what they hold beyond the floor.
    by_load = sorted(live, key=lambda m: (-len(owned[m]), m))
    ceiling_seats = extra
    for m in by_load:
        share = floor + 1 if ceiling_seats and len(owned[m]) > floor else floor
        if share > floor:
            ceiling_seats -= 1
        while len(owned[m]) > share:
            owned[m].remove(min(owned[m], key=lambda p, m=m: w(p, m)))

    free = [p for p in range(partitions) if not any(p in ps for ps in owned.values())]
    for p in free:
        under = [m for m in live if len(owned[m]) < floor]
        if not under:
            at_ceiling = sum(len(owned[m]) > floor for m in live)
            under = [m for m in live if len(owned[m]) == floor and at_ceiling < extra]
        owner = max(under, key=lambda m: w(p, m))
        owned[owner].add(p)
    return {m: sorted(ps) for m, ps in owned.items()}


def assign(stage: str, partitions: int, members: Iterable[str]) -> dict[str, list[int]]:
    """The assignment for `members` starting from nothing held."""
    return rebalance(stage, partitions, {m: () for m in members})


def owner_of(assignment: Mapping[str, Iterable[int]]) -> dict[int, str]:
    """Invert an assignment: partition -> member."""
    return {p: m for m, ps in assignment.items() for p in ps}
