"""Safety rules: the only component that signs votes and timeouts.

Theory of operation
-------------------
Safety of the 2-chain protocol (see ``docs/consensus.md``) rests on three
promises each honest validator keeps, across crashes:

1. it votes at most once per round, and never in a round it has timed out of
   (``last_voted_round`` only grows);
2. it votes for a block only if the block extends the certificate of the round
   just before it, or, after a timeout certificate, a certificate at least as
   high as every certificate the timeout signers reported;
3. it signs a timeout only with a certificate at least as high as any it has
   seen (``locked_round``), so a timeout certificate can never hide a block
   that may have been committed.

:class:`SafetyData` records what those promises depend on. It is written to the
:class:`SafetyStore` (durably, for the daemon) *before* the signed vote or
timeout can leave, so no message can leave that the store does not know of.
Asked again in the same round, the rules return the stored vote or timeout
instead of signing anew.

The core handles each input (a message, a tick, new transactions) inside
:meth:`SafetyRules.deferred`: what the input changes is written once, when the
input has been handled and before any of the messages it produced is sent. A
leader that proposes and votes for its own proposal then waits for one write
instead of two before its proposal goes out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

from .. import crypto
from ..codec import as_map, as_optional, as_uint
from ..errors import SafetyViolation
from .types import Block, QuorumCert, Timeout, TimeoutCert, ValidatorSet, Vote


@dataclass(frozen=True)
class SafetyData:
    epoch: int = 0
    #: Highest round this validator voted in or timed out of.
    last_voted_round: int = 0
    #: Highest certified round observed (the 2-chain lock): timeouts must carry a QC at least this high.
    locked_round: int = 0
    #: Highest round this validator signed a timeout for.
    highest_timeout_round: int = 0
    last_vote: Vote | None = None
    last_timeout: Timeout | None = None
    #: Highest round this validator proposed a block in (a leader proposes once per round).
    last_proposed_round: int = 0
    #: The certificates behind the last signature: after a restart they justify the round this
    #: validator is in, so it can time out of it (and peers accept the timeout) even if no stored
    #: block carries them.
    high_qc: QuorumCert | None = None
    high_tc: TimeoutCert | None = None
    #: Set when the node was restored from a backup: what it signed before is unknown, so it
    #: signs nothing until :meth:`SafetyRules.lift_restore` sets a floor above all of it.
    restored: bool = False
    #: After a restore: no vote or proposal in this round or below (timeouts are not bound by it).
    vote_floor: int = 0

    def to_wire(self) -> dict[str, Any]:
        def opt(x: Any) -> Any:
            return None if x is None else x.to_wire()

        return {
            "epoch": self.epoch, "last_voted_round": self.last_voted_round, "locked_round": self.locked_round,
            "highest_timeout_round": self.highest_timeout_round, "last_vote": opt(self.last_vote),
            "last_timeout": opt(self.last_timeout), "last_proposed_round": self.last_proposed_round,
            "high_qc": opt(self.high_qc), "high_tc": opt(self.high_tc),
            **({"restored": True} if self.restored else {}),
            **({"vote_floor": self.vote_floor} if self.vote_floor else {}),
        }

    @classmethod
    def from_wire(cls, value: Any) -> SafetyData:
        keys = ("epoch", "last_voted_round", "locked_round", "highest_timeout_round", "last_vote", "last_timeout",
                "last_proposed_round", "high_qc", "high_tc")
        # Optional fields, written only when set (files from before they existed still load).
        restored = isinstance(value, dict) and value.get("restored") is True
        vote_floor = as_uint(value.get("vote_floor", 0), "vote_floor") if isinstance(value, dict) else 0
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in ("restored", "vote_floor")}
        m = as_map(value, "safety data", keys)
        return cls(
            as_uint(m["epoch"], "epoch"),
            as_uint(m["last_voted_round"], "last_voted_round"),
            as_uint(m["locked_round"], "locked_round"),
            as_uint(m["highest_timeout_round"], "highest_timeout_round"),
            as_optional(m["last_vote"], "last_vote", Vote.from_wire),
            as_optional(m["last_timeout"], "last_timeout", Timeout.from_wire),
            as_uint(m["last_proposed_round"], "last_proposed_round"),
            as_optional(m["high_qc"], "high_qc", QuorumCert.from_wire),
            as_optional(m["high_tc"], "high_tc", TimeoutCert.from_wire),
            restored,
            vote_floor,
        )

    def with_certificates(self, qc: QuorumCert, tc: TimeoutCert | None) -> SafetyData:
        high_qc = qc if self.high_qc is None or qc.round > self.high_qc.round else self.high_qc
        high_tc = self.high_tc
        if tc is not None and (high_tc is None or tc.round > high_tc.round):
            high_tc = tc
        return replace(self, high_qc=high_qc, high_tc=high_tc)


class SafetyStore(Protocol):
    """Where SafetyData lives. ``save`` returns only once the data is durable."""

    def load(self) -> SafetyData | None: ...

    def save(self, data: SafetyData) -> None: ...


class MemorySafetyStore:
    """SafetyData in memory: for the simulator, where "durable" means "survives a simulated crash"."""

    def __init__(self) -> None:
        self.data: SafetyData | None = None
        self.saves = 0

    def load(self) -> SafetyData | None:
        return self.data

    def save(self, data: SafetyData) -> None:
        self.data = data
        self.saves += 1


class SafetyRules:
    """Decides whether this validator may sign, and signs.

    ``unsafe_skip_vote_rule`` exists only so tests can prove the simulator
    catches a broken protocol; nothing outside tests may set it.
    """

    def __init__(
        self, vset: ValidatorSet, index: int | None, identity: crypto.Identity, store: SafetyStore,
        *, unsafe_skip_vote_rule: bool = False,
    ) -> None:
        # index None: this node follows the epoch without being one of its validators (a member
        # that joins later, catching up; one that was removed). It signs nothing.
        if index is not None and vset.keys[index] != identity.public_key:
            raise ValueError(f"identity is not validator {index} of the genesis set")
        self.vset = vset
        self.index = index
        self._identity = identity
        self._store = store
        self._unsafe_skip_vote_rule = unsafe_skip_vote_rule
        data = store.load()
        if data is not None and data.epoch > vset.epoch:
            raise ValueError(f"safety data is of epoch {data.epoch}, later than epoch {vset.epoch}")
        if data is None or data.epoch < vset.epoch:
            # A new epoch: rounds start again, and its messages are signed over its number, so
            # nothing signed in an earlier epoch can count in this one. A restore still holds.
            data = SafetyData(epoch=vset.epoch, restored=data is not None and data.restored)
            store.save(data)
        self._data = data
        self._saved = data  # what the store holds
        self._deferring = False
        self._unsaved = False

    @property
    def data(self) -> SafetyData:
        return self._data

    def _check_not_restored(self) -> None:
        if self.index is None:
            raise SafetyViolation(f"not a validator of epoch {self.vset.epoch}", reason="not_validator")
        if self._data.restored:
            raise SafetyViolation("restored from a backup: waiting for peers' certificates before signing",
                                  reason="restored")

    def lift_restore(self, qc: QuorumCert, tc: TimeoutCert | None) -> int:
        """Resume signing after a restore, above every round this validator may have voted in.

        ``qc`` and ``tc`` are the highest certificates reported (and verified) by 2f+1 other
        validators. Any round R this validator signed in before was entered through a
        certificate for R-1, made of votes or timeouts of 2f+1 validators; at least one honest
        one among them also answered, holding a certificate for at least R-2. So R <= C + 2
        for the highest certified round C reported: votes and proposals resume above C + 2
        (the returned floor). Timeouts are not held back: a second timeout in a round is
        harmless as long as it carries a QC at least as high as the lock, and the lock is set
        to the highest QC reported, which is at least the round of any QC formed with this
        validator's votes (what safety needs of a lock). Without them, the others could wait
        for this validator's timeout in a round below the floor forever.
        """
        certified = max(qc.round, tc.round if tc is not None else 0)
        floor = certified + 2
        data = self._data
        self._persist(replace(
            data, restored=False, vote_floor=max(data.vote_floor, floor),
            locked_round=max(data.locked_round, qc.round),
        ).with_certificates(qc, tc))
        return floor

    def _persist(self, data: SafetyData) -> None:
        # Durable before the caller can send what it signed: now, or when deferred() ends.
        if self._deferring:
            self._unsaved = True
        else:
            self._store.save(data)
            self._saved = data
        self._data = data

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Writes to the store made inside are made once, on leaving (also on an error).

        Whatever is signed inside must not leave before then: the core's caller gets the
        messages an input produced only once this has returned. If that write fails, the
        rules forget what was signed inside (it never left), as if it had not been signed.
        """
        if self._deferring:
            yield
            return
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
            if self._unsaved:
                self._unsaved = False
                try:
                    self._store.save(self._data)
                except BaseException:
                    self._data = self._saved
                    raise
                self._saved = self._data

    def vote(self, block: Block, tc: TimeoutCert | None) -> Vote:
        """Sign a vote for ``block`` (already verified by the caller) or raise SafetyViolation."""
        data = self._data
        self._check_not_restored()
        qc = block.qc
        assert qc is not None
        if data.last_vote is not None and data.last_vote.round == block.round:
            return data.last_vote
        if block.epoch != data.epoch:
            raise SafetyViolation(f"block of epoch {block.epoch}, safety data is epoch {data.epoch}",
                                  reason="wrong_epoch")
        if block.round <= max(data.last_voted_round, data.vote_floor):
            raise SafetyViolation(
                f"round {block.round} is not above last voted round {max(data.last_voted_round, data.vote_floor)}",
                reason="old_round",
            )
        if not self._unsafe_skip_vote_rule and not self._safe_to_vote(block.round, qc, tc):
            raise SafetyViolation(
                f"block at round {block.round} extends neither round {block.round - 1}'s certificate nor a "
                "timeout certificate's highest one", reason="unsafe_vote"
            )
        assert self.index is not None  # _check_not_restored refused a node that is not a validator
        vote = Vote.create(block.vote_data(), self.index, self._identity, self.vset.chain_id)
        self._persist(replace(
            data, last_voted_round=block.round, locked_round=max(data.locked_round, qc.round), last_vote=vote,
        ).with_certificates(qc, tc))
        return vote

    def propose(self, block: Block) -> Block:
        """Sign this validator's proposal ``block``; at most one per round, across restarts."""
        data = self._data
        self._check_not_restored()
        if block.author != self.index:
            raise SafetyViolation(f"block authored by {block.author}, this is validator {self.index}",
                                  reason="not_author")
        if block.round <= max(data.last_proposed_round, data.vote_floor):
            raise SafetyViolation(f"already proposed in round {max(data.last_proposed_round, data.vote_floor)}",
                                  reason="proposed_twice")
        signed = block.signed(self._identity, self.vset.chain_id)
        self._persist(replace(data, last_proposed_round=block.round))
        return signed

    @staticmethod
    def _safe_to_vote(round_: int, qc: QuorumCert, tc: TimeoutCert | None) -> bool:
        if round_ == qc.round + 1:
            return True
        return tc is not None and round_ == tc.round + 1 and qc.round >= tc.highest_hqc_round

    def timeout(self, round_: int, high_qc: QuorumCert, high_tc: TimeoutCert | None) -> Timeout:
        """Sign a timeout for ``round_`` carrying ``high_qc``, or raise SafetyViolation."""
        data = self._data
        self._check_not_restored()
        if data.last_timeout is not None and data.last_timeout.round == round_:
            return data.last_timeout
        if round_ < data.last_voted_round:
            raise SafetyViolation(
                f"round {round_} is below last voted round {data.last_voted_round}", reason="old_round"
            )
        entered_by_qc = round_ == high_qc.round + 1
        entered_by_tc = high_tc is not None and round_ == high_tc.round + 1
        if not (entered_by_qc or entered_by_tc):
            raise SafetyViolation(f"round {round_} was entered by no certificate", reason="unjustified_round")
        if high_qc.round < data.locked_round:
            raise SafetyViolation(
                f"certificate round {high_qc.round} below locked round {data.locked_round}", reason="below_lock"
            )
        assert self.index is not None  # _check_not_restored refused a node that is not a validator
        timeout = Timeout.create(data.epoch, round_, high_qc, self.index, self._identity, self.vset.chain_id)
        self._persist(replace(
            data,
            last_voted_round=max(data.last_voted_round, round_),
            highest_timeout_round=max(data.highest_timeout_round, round_),
            locked_round=max(data.locked_round, high_qc.round),
            last_timeout=timeout,
        ).with_certificates(high_qc, high_tc))
        return timeout
