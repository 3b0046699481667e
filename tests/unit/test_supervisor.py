"""The supervisor's restart policy: a doubling delay while a child keeps crashing fast, reset
by a child that ran a while, and giving up after repeated fast crashes."""

from shared.app.supervisor import FAST_CRASH, GIVE_UP_AFTER, RESTART_DELAY, Restarts


def test_the_delay_doubles_while_a_child_crashes_fast_then_it_gives_up():
    restarts = Restarts()
    delays = [restarts.delay(0.5) for _ in range(GIVE_UP_AFTER - 1)]
    assert delays == [RESTART_DELAY * 2**i for i in range(GIVE_UP_AFTER - 1)]
    assert restarts.delay(0.5) is None


def test_a_child_that_ran_a_while_starts_the_count_over():
    restarts = Restarts()
    for _ in range(GIVE_UP_AFTER - 1):
        restarts.delay(0.5)
    assert restarts.delay(FAST_CRASH + 1) == RESTART_DELAY
    assert restarts.delay(0.5) == RESTART_DELAY
