"""The accounting identity under replays and purges, without a server."""

from shared.accounting import Snapshot, account
from shared.app.args import parse_time
from shared.deadletter import Entry, entry_headers
from shared.dlq import EntryFilter
from shared.status import StageStatus, Status, format_status, verdict

CHANNELS = {"intake": 0, "assemble": 0, "inference": 0, "post": 0, "stream": 0}


def snap(**kw) -> Snapshot:
    base = dict(
        intake_stored=0,
        results_stored=0,
        dead_letters_stored=0,
        dead_letters_now=0,
        channel_messages=dict(CHANNELS),
        replayed={},
        purged=0,
    )
    base.update(kw)
    return Snapshot(**base)


def test_quiet_pipeline_balances():
    a = account(snap(intake_stored=100, results_stored=90, dead_letters_stored=10,
                     dead_letters_now=10))  # fmt: skip
    assert (a.accepted, a.completed, a.dead_lettered, a.in_flight) == (100, 90, 10, 0)
    assert a.balanced


def test_in_flight_counts_messages_in_channels():
    a = account(snap(intake_stored=10, results_stored=4,
                     channel_messages={**CHANNELS, "intake": 3, "post": 3}))  # fmt: skip
    assert a.in_flight == 6
    assert a.balanced


def test_replay_into_intake_is_not_a_new_acceptance():
    # 10 accepted, 2 dead-lettered at rag, both replayed to intake and completed.
    a = account(snap(intake_stored=12, results_stored=10, dead_letters_stored=2,
                     replayed={"intake": 2}))  # fmt: skip
    assert (a.accepted, a.dead_lettered, a.replayed) == (10, 0, 2)
    assert a.balanced


def test_replay_into_inner_channel_moves_request_back_in_flight():
    a = account(snap(intake_stored=5, results_stored=4, dead_letters_stored=1,
                     replayed={"inference": 1},
                     channel_messages={**CHANNELS, "inference": 1}))  # fmt: skip
    assert (a.dead_lettered, a.in_flight) == (0, 1)
    assert a.balanced


def test_purged_entries_stay_dead_lettered():
    a = account(snap(intake_stored=5, results_stored=3, dead_letters_stored=2,
                     dead_letters_now=0, purged=2))  # fmt: skip
    assert (a.dead_lettered, a.dead_letters_now, a.purged) == (2, 0, 2)
    assert a.balanced


def test_unbalanced_is_reported():
    a = account(snap(intake_stored=5, results_stored=3))
    assert not a.balanced
    assert a.surplus == -2


def status_of(a, ack_pending=0) -> Status:
    return Status(a, [StageStatus("inference", queued=0, ack_pending=ack_pending,
                                  redelivered=0, waiting_pulls=1)])  # fmt: skip


def test_messages_published_past_the_intake_are_named_as_the_cause():
    # 11 accepted through the intake; 2 more published straight to an inner stage subject,
    # dead-lettered there as invalid. Nothing moves: the imbalance stays, and says why.
    a = account(snap(intake_stored=11, results_stored=6, dead_letters_stored=7))
    assert (a.accepted, a.completed, a.dead_lettered, a.in_flight) == (11, 6, 7, 0)
    assert (a.balanced, a.surplus) == (False, 2)
    text, why = verdict(status_of(a))
    assert text == "NOT balanced: 2 more than accepted"
    assert why[0] == (
        "messages published straight to stage subjects, not through the intake, "
        "are not counted as accepted"
    )
    assert why[1].startswith("a request that ended in two places: redelivered after a fault")
    first = format_status(status_of(a)).splitlines()[:2]
    assert first[0].endswith("[NOT balanced: 2 more than accepted]")
    assert first[1].startswith("  (messages published straight to stage subjects")
    assert "still moving" not in format_status(status_of(a))


def test_surplus_while_messages_move_says_so_too():
    a = account(snap(intake_stored=5, results_stored=3, dead_letters_stored=1,
                     channel_messages={**CHANNELS, "post": 2}))  # fmt: skip
    _, why = verdict(status_of(a, ack_pending=1))
    assert why[0] == "messages are moving: one being handed on counts twice for a moment"
    assert len(why) == 3


def test_missing_requests_are_not_blamed_on_movement():
    text, why = verdict(status_of(account(snap(intake_stored=5, results_stored=3))))
    assert text == "NOT balanced: 2 accepted requests missing"
    assert "deleted from a channel stream" in why[0]


def test_balanced_status_has_no_explanation_and_json_keeps_its_keys():
    a = account(snap(intake_stored=4, results_stored=3, dead_letters_stored=1))
    assert verdict(status_of(a)) == ("balanced", [])
    accounts = status_of(a).to_dict()["accounts"]
    assert accounts == {"accepted": 4, "completed": 3, "dead_lettered": 1, "in_flight": 0,
                        "dead_letters_now": 0, "replayed": 0, "purged": 0,
                        "balanced": True, "surplus": 0}  # fmt: skip


def test_filter_matches_headers_and_time():
    headers = entry_headers(reason="failed", error="E", stage="post", subject="orch.post.1",
                            delivered=3, request_id="r1", session_id="s1", now=100.0)  # fmt: skip
    entry = Entry.parse(7, b"{}", headers)
    assert (entry.reason, entry.stage, entry.delivered, entry.failed_at) == (
        "failed",
        "post",
        3,
        100.0,
    )
    assert EntryFilter(session="s1", request_id="r1", since=100.0, until=101.0).matches(entry)
    assert not EntryFilter(session="s2").matches(entry)
    assert not EntryFilter(since=100.5).matches(entry)
    assert not EntryFilter(until=100.0).matches(entry)


def test_entry_headers_are_single_line_and_bounded():
    headers = entry_headers(reason="invalid", error="a\nb" + "x" * 5000, stage="rag",
                            subject="orch.intake.0", delivered=1,
                            original={"traceparent": "00-abc-def-01"})  # fmt: skip
    assert "\n" not in headers["Orch-Error"]
    assert len(headers["Orch-Error"]) <= 1024
    assert headers["traceparent"] == "00-abc-def-01"


def test_parse_time_forms():
    assert parse_time("90s", now=1000.0) == 910.0
    assert parse_time("2h", now=10_000.0) == 2800.0
    assert parse_time("1700000000") == 1700000000.0
    assert parse_time("2026-01-01T00:00:00+00:00") == 1767225600.0


def test_header_values_round_trip_any_text_as_ascii():
    for text in ("会话 with.dots*>", "100% done\r\nnext", "ü: Extra inputs", "tab\there"):
        headers = entry_headers(reason="invalid", error=text, stage="rag", subject="s",
                                delivered=1, session_id=text)  # fmt: skip
        assert headers["Orch-Error"].isascii() and headers["Orch-Session-Id"].isascii()
        entry = Entry.parse(1, b"", headers)
        assert (entry.error, entry.session_id) == (text, text)


def test_a_long_session_id_is_kept_whole_so_filters_match_it():
    session = "会话" * 512  # the longest the envelope allows, 9 characters each when encoded
    headers = entry_headers(reason="failed", error="E", stage="post", subject="s",
                            delivered=1, session_id=session)  # fmt: skip
    entry = Entry.parse(1, b"", headers)
    assert entry.session_id == session
    assert EntryFilter(session=session).matches(entry)
