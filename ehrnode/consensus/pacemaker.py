"""Pacemaker: which round we are in, and when to give up on it.

A round is entered through a certificate for the previous round (a QC or a
TC). Its timeout grows exponentially with the number of rounds since the last
certified one, so that after a period of asynchrony honest validators' timeouts
grow until they overlap, then shrink back at once when certificates flow
again. After the local timeout fires, our timeout message is re-broadcast every
``resend_interval`` until the round changes: a lost timeout would otherwise
stall the round forever.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PacemakerConfig:
    base_timeout: float = 1.0
    backoff: float = 1.5
    max_timeout: float = 30.0
    resend_interval: float = 1.0
    #: A timeout for a round this far ahead of ours is dropped, not stored (memory bound).
    max_round_ahead: int = 1000


class Pacemaker:
    def __init__(self, config: PacemakerConfig) -> None:
        self.config = config
        self.round = 0
        self.round_started = 0.0
        self.deadline = float("inf")
        self.timed_out = False
        self.next_resend = float("inf")

    def duration(self, round_: int, highest_certified_round: int) -> float:
        """How long round ``round_`` waits for progress before timing out."""
        missed = max(0, round_ - highest_certified_round - 1)
        c = self.config
        # Bounded exponent: the cap is reached long before the float overflows.
        return min(c.base_timeout * c.backoff ** min(missed, 64), c.max_timeout)

    def enter(self, round_: int, highest_certified_round: int, now: float) -> bool:
        """Move to ``round_`` if it is newer; returns whether the round changed."""
        if round_ <= self.round:
            return False
        self.round = round_
        self.round_started = now
        self.deadline = now + self.duration(round_, highest_certified_round)
        self.timed_out = False
        self.next_resend = float("inf")
        return True

    def expired(self, now: float) -> bool:
        """True once when the current round's timer runs out."""
        if not self.timed_out and now >= self.deadline:
            self.timed_out = True
            self.next_resend = now + self.config.resend_interval
            return True
        return False

    def give_up(self, now: float) -> None:
        """Time out the current round now, before its timer (others already have)."""
        if not self.timed_out:
            self.timed_out = True
            self.next_resend = now + self.config.resend_interval

    def resend_due(self, now: float) -> bool:
        """True when our timeout for this round should be sent again."""
        if self.timed_out and now >= self.next_resend:
            self.next_resend = now + self.config.resend_interval
            return True
        return False

    def next_wakeup(self) -> float:
        return self.next_resend if self.timed_out else self.deadline
