"""After a restore from backup: ask the other validators how far the chain got, before signing again.

A validator restored from a backup does not know what it signed after the
backup was taken, so its safety data starts *restored* and it signs nothing
(:class:`~ehrnode.consensus.safety.SafetyRules` refuses). It asks every other
validator for its highest certificates (QC and TC); each answer is verified
against the validator set. Once 2f+1 *other* validators have answered, the
highest certified round among their answers bounds every round the restored
validator can have signed in (see :meth:`SafetyRules.lift_restore`), and it
resumes signing above that bound.

Answers are bound to a fresh nonce so an old answer cannot be replayed into a
later survey; a Byzantine validator can only report certificates that really
exist (they are verified), so it cannot push the floor up. A validator answers
only once its core has loaded its certificates, and not while it is restored
itself. With n = 3f+1 a restored validator needs every other validator to
answer: one that is down or withholds its answer holds the restored one back
(it keeps asking), so restore one validator at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .. import codec
from ..codec import as_bytes, as_map, as_optional
from ..errors import CodecError, InvalidMessage
from .types import QuorumCert, TimeoutCert, ValidatorSet

NONCE_SIZE = 16


def encode_answer(nonce: bytes, qc: QuorumCert, tc: TimeoutCert | None) -> bytes:
    return codec.encode({"nonce": nonce, "qc": qc.to_wire(), "tc": None if tc is None else tc.to_wire()})


def decode_answer(data: bytes) -> tuple[bytes, QuorumCert, TimeoutCert | None]:
    m = as_map(codec.decode(data), "round answer", ("nonce", "qc", "tc"))
    return (as_bytes(m["nonce"], "round answer nonce", size=NONCE_SIZE), QuorumCert.from_wire(m["qc"]),
            as_optional(m["tc"], "round answer tc", TimeoutCert.from_wire))


@dataclass
class RoundSurvey:
    vset: ValidatorSet
    me: int
    nonce: bytes

    def __post_init__(self) -> None:
        self.answers: dict[int, tuple[QuorumCert, TimeoutCert | None]] = {}

    @classmethod
    def fresh(cls, vset: ValidatorSet, me: int) -> RoundSurvey:
        return cls(vset, me, os.urandom(NONCE_SIZE))

    @property
    def needed(self) -> int:
        return self.vset.quorum

    def add(self, sender: int, data: bytes) -> None:
        """Take one validator's answer (raises InvalidMessage for a bad one)."""
        if sender == self.me:
            return
        try:
            nonce, qc, tc = decode_answer(data)
        except CodecError as exc:
            raise InvalidMessage(f"round answer: {exc}", reason="malformed") from exc
        if nonce != self.nonce:
            return  # an answer to an earlier survey
        qc.verify(self.vset)
        if tc is not None:
            tc.verify(self.vset)
        self.answers[sender] = (qc, tc)

    def result(self) -> tuple[QuorumCert, TimeoutCert | None] | None:
        """The highest QC and TC reported, once 2f+1 other validators answered."""
        if len(self.answers) < self.needed:
            return None
        qc = max((a[0] for a in self.answers.values()), key=lambda c: c.round)
        tcs = [a[1] for a in self.answers.values() if a[1] is not None]
        return qc, max(tcs, key=lambda c: c.round) if tcs else None

    def view(self) -> dict[str, Any]:
        return {"answered": sorted(self.answers), "needed": self.needed}
