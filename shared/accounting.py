"""Where every accepted request is: completed, dead-lettered or in flight.

Computed from server-side counters, never from process memory, so it survives restarts:
stream sequences only grow, and operator replays are counted in the counters stream.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Snapshot:
    """Raw numbers read from the server at one moment."""

    intake_stored: int
    """Messages ever stored in the intake stream (its last sequence)."""
    results_stored: int
    """Results ever stored (the results stream's last sequence)."""
    dead_letters_stored: int
    """Entries ever stored in the dead-letter stream (its last sequence)."""
    dead_letters_now: int
    """Entries the dead-letter stream holds now."""
    channel_messages: dict[str, int]
    """Messages each channel stream holds now: received but not yet passed on."""
    replayed: dict[str, int]
    """Dead-letter entries replayed, per channel they were sent back to."""
    purged: int
    """Dead-letter entries deleted by operators."""
    outcomes: int = 0
    """Outcomes of dead-lettered requests ever stored in the results stream (beside results)."""


@dataclass(frozen=True)
class Accounts:
    """The accounting identity: accepted = completed + dead_lettered + in_flight."""

    accepted: int
    completed: int
    dead_lettered: int
    in_flight: int
    dead_letters_now: int
    replayed: int
    purged: int

    @property
    def balanced(self) -> bool:
        """Whether the identity holds (exactly, once the pipeline is quiet)."""
        return self.surplus == 0

    @property
    def surplus(self) -> int:
        """completed + dead_lettered + in_flight - accepted: 0 when the identity holds.

        Above 0 when messages entered past the intake: a message published straight to an
        inner stage subject is completed, dead-lettered or in flight without having been
        accepted (the server keeps no count of such messages apart from the stages' own
        output, so they cannot be counted as accepted). Also above 0 for a moment while a
        stage hands a message on (its output is stored just before its input is acked).
        Below 0 when accepted requests left the channel streams outside the pipeline.
        """
        return self.completed + self.dead_lettered + self.in_flight - self.accepted


def account(snap: Snapshot) -> Accounts:
    """Apply the identity's definitions to a snapshot.

    A replay moves a request from dead-lettered back to in flight; a replay into the intake
    stores a second intake message that is not a new acceptance. A purged entry stays
    counted as dead-lettered: that is where the request ended.
    """
    replayed = sum(snap.replayed.values())
    return Accounts(
        accepted=snap.intake_stored - snap.replayed.get("intake", 0),
        completed=snap.results_stored - snap.outcomes,
        dead_lettered=snap.dead_letters_stored - replayed,
        in_flight=sum(snap.channel_messages.values()),
        dead_letters_now=snap.dead_letters_now,
        replayed=replayed,
        purged=snap.purged,
    )
