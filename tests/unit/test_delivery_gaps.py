"""Deliveries lost on the way, found from the consumer's delivery numbers."""

from shared.transport.pull import DeliveryGaps


def test_numbers_in_order_owe_nothing() -> None:
    gaps = DeliveryGaps()
    for seq in (41, 42, 43):  # a consumer taken over mid-way starts anywhere
        gaps.saw(seq)
    assert gaps.since is None


def test_a_skipped_number_is_missing_until_renumbered_below_it() -> None:
    gaps = DeliveryGaps()
    for seq in (1, 2, 5):
        gaps.saw(seq)
    assert gaps.since is not None  # 3 and 4 never came
    gaps.saw(6)
    assert gaps.since is not None
    gaps.saw(3)  # a new leader numbers from 3 again: it delivers 3 and 4 afresh
    assert gaps.since is None


def test_a_renumbering_above_a_gap_keeps_it() -> None:
    gaps = DeliveryGaps()
    for seq in (1, 3, 4, 5, 4):
        gaps.saw(seq)
    assert gaps.since is not None  # 2 is still owed
