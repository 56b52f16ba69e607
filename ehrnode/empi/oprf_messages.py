"""What members send each other to have values evaluated under the OPRF key.

A request names the committed ``empi.oprf_batch`` transaction it belongs to and carries the
blinded points; an answer carries, for the same batch, the evaluating member's points and
its proof, or why it refused. Both travel over the authenticated peer links, so who sent a
message is the peer it came from. Decoding is strict (CodecError/SchemaError).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from .. import codec
from ..codec import as_bytes, as_list, as_map, as_str, as_uint
from ..errors import SchemaError
from . import oprf

#: The most points in one batch (as ``empi.oprf_batch`` allows).
MAX_POINTS = 4096
MAX_MESSAGE_BYTES = MAX_POINTS * (oprf.POINT_BYTES + 2) + 1024


def points_digest(points: Sequence[bytes]) -> bytes:
    """What an ``empi.oprf_batch`` commits to: SHA-256 of the encoded points in order."""
    return hashlib.sha256(b"ehrnode/oprf-batch/v1" + b"".join(points)).digest()


def proof_context(chain_id: str, batch: bytes, evaluator: str) -> bytes:
    """Bound into an answer's proof: it is this member's answer to this batch, on this chain."""
    return codec.encode(["ehrnode/oprf-answer/v1", chain_id, batch, evaluator])


@dataclass(frozen=True)
class EvaluationRequest:
    batch: bytes                   # the id of the committed empi.oprf_batch transaction
    points: tuple[bytes, ...]

    def encode(self) -> bytes:
        return codec.encode({"batch": self.batch, "points": list(self.points)})

    @classmethod
    def decode(cls, data: bytes) -> EvaluationRequest:
        m = as_map(codec.decode(data, max_size=MAX_MESSAGE_BYTES), "oprf request", ("batch", "points"))
        points = as_list(m["points"], "oprf request.points", max_len=MAX_POINTS)
        return cls(as_bytes(m["batch"], "oprf request.batch", size=32),
                   tuple(as_bytes(p, "oprf request.points[]", size=oprf.POINT_BYTES) for p in points))


@dataclass(frozen=True)
class EvaluationAnswer:
    batch: bytes
    status: str                    # "ok" or "refused"
    reason: str = ""
    round: int = 0
    evaluated: tuple[bytes, ...] = ()
    proof: bytes = b""

    def encode(self) -> bytes:
        return codec.encode({"batch": self.batch, "status": self.status, "reason": self.reason, "round": self.round,
                             "evaluated": list(self.evaluated), "proof": self.proof})

    @classmethod
    def decode(cls, data: bytes) -> EvaluationAnswer:
        m = as_map(codec.decode(data, max_size=MAX_MESSAGE_BYTES), "oprf answer",
                   ("batch", "status", "reason", "round", "evaluated", "proof"))
        status = as_str(m["status"], "oprf answer.status", max_len=16)
        if status not in ("ok", "refused"):
            raise SchemaError("oprf answer.status: ok or refused")
        evaluated = as_list(m["evaluated"], "oprf answer.evaluated", max_len=MAX_POINTS)
        return cls(as_bytes(m["batch"], "oprf answer.batch", size=32), status,
                   as_str(m["reason"], "oprf answer.reason", max_len=256), as_uint(m["round"], "oprf answer.round"),
                   tuple(as_bytes(p, "oprf answer.evaluated[]", size=oprf.POINT_BYTES) for p in evaluated),
                   as_bytes(m["proof"], "oprf answer.proof", max_len=oprf.PROOF_BYTES))
