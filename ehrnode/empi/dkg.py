"""Sharing the OPRF key: Shamir shares, Feldman commitments, and dealings.

A *dealing* is one member's contribution to a round of the key's distributed
generation (:mod:`ehrnode.ledger.oprf_rounds` runs the rounds on the chain). The
dealer picks a polynomial ``f`` of degree ``t - 1``, publishes commitments
``C_j = a_j * G`` to its coefficients and seals ``f(i)`` to each participant ``i``
(by its X25519 sealing key). Anyone can compute ``F(i) = sum_j i^j * C_j = f(i) * G``
from the commitments, so a participant checks its share against them, and the
chain checks a share a dealer had to reveal, without learning the polynomial.

* In a **fresh** round each dealer's ``f(0)`` is random; the key is the sum of the
  qualified dealers' ``f(0)``, which nobody ever computes: participant ``i``'s share
  is the sum of the ``f_d(i)`` sealed to it.
* In a **reshare** round each dealer is a holder of the previous round, ``f(0)`` is
  its previous share (the chain checks ``C_0`` against its previous public share),
  and the new shares are the Lagrange-weighted sums over the dealers: the key is
  unchanged, the shares and the threshold are new, and old shares no longer
  combine with new ones.

Either way a round's result is ``share_i = sum_d w_d f_d(i)`` with public share
``K_i = sum_d w_d F_d(i)``: weights 1 (fresh) or the dealers' Lagrange coefficients
over their previous indices (reshare).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import codec, crypto
from ..errors import CryptoError, SchemaError
from . import oprf

_SHARE_DOMAIN = b"ehrnode/oprf-share/v1"
#: A round shares among at most this many institutions.
MAX_PARTICIPANTS = 64


def threshold_for(participants: int) -> int:
    """How many members must answer together: a majority of the institutions.

    A minority (whatever it colludes on) cannot compute a pseudonym, and a minority may be down
    without stopping enrolment. One institution alone necessarily holds the whole key.
    """
    return participants // 2 + 1


def share_context(chain_id: str, round_: int, dealer: str, recipient: str) -> bytes:
    return _SHARE_DOMAIN + codec.encode([chain_id, round_, dealer, recipient])


def polynomial_at(coefficients: Sequence[int], x: int) -> int:
    acc = 0
    for a in reversed(coefficients):
        acc = (acc * x + a) % oprf.ORDER
    return acc


def committed_value(commitments: Sequence[oprf.PublicKey], index: int) -> oprf.PublicKey:
    """``F(index) = f(index) * G`` from the commitments to ``f``'s coefficients."""
    terms = [commitments[0]] + [oprf.multiply(c, pow(index, j, oprf.ORDER))
                                for j, c in enumerate(commitments) if j]
    return oprf.add(terms)


def check_share(commitments: Sequence[oprf.PublicKey], index: int, share: int) -> bool:
    """Whether ``share`` is ``f(index)`` for the polynomial the commitments are to."""
    if not 0 < share < oprf.ORDER:
        return False
    try:
        return oprf.base_multiply(share) == committed_value(commitments, index)
    except CryptoError:
        return False


@dataclass(frozen=True)
class Dealing:
    """Commitments to a polynomial's coefficients, and its value at each participant, sealed to it."""

    commitments: tuple[bytes, ...]
    shares: Mapping[str, bytes]

    def body(self, round_: int) -> dict[str, Any]:
        return {"round": round_, "commitments": list(self.commitments), "shares": dict(self.shares)}

    def points(self) -> list[oprf.PublicKey]:
        return [oprf.decode_point(c, "commitment") for c in self.commitments]

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Dealing:
        return cls(tuple(body["commitments"]), dict(body["shares"]))


def deal(chain_id: str, round_: int, dealer: str, secret: int, threshold: int,
         recipients: Mapping[str, tuple[int, bytes]]) -> Dealing:
    """A dealing of ``secret`` at ``threshold`` to ``recipients`` (name: (index, sealing key)), with
    the other coefficients random."""
    coefficients = [secret % oprf.ORDER] + [oprf.random_scalar() for _ in range(threshold - 1)]
    return deal_polynomial(chain_id, round_, dealer, coefficients, recipients)


def deal_polynomial(chain_id: str, round_: int, dealer: str, coefficients: Sequence[int],
                    recipients: Mapping[str, tuple[int, bytes]]) -> Dealing:
    """A dealing of the polynomial with ``coefficients`` (constant term first, none zero)."""
    if any(a % oprf.ORDER == 0 for a in coefficients):
        raise CryptoError("a dealing's coefficients must not be zero")
    commitments = tuple(oprf.encode_point(oprf.base_multiply(a)) for a in coefficients)
    shares = {name: crypto.seal_to(sealing_key, oprf.scalar_bytes(polynomial_at(coefficients, index)),
                                   share_context(chain_id, round_, dealer, name))
              for name, (index, sealing_key) in recipients.items()}
    return Dealing(commitments, shares)


def open_share(sealing: crypto.SealingKey, chain_id: str, round_: int, dealer: str, recipient: str,
               sealed: bytes) -> int:
    """The share sealed to ``recipient`` in a dealing (CryptoError if it does not open)."""
    raw = sealing.open(sealed, share_context(chain_id, round_, dealer, recipient))
    if len(raw) != oprf.SCALAR_BYTES:
        raise CryptoError("a share is 32 bytes")
    return int.from_bytes(raw, "big")


def check_dealing_body(body: Any, threshold: int, participants: Sequence[str]) -> list[oprf.PublicKey]:
    """The commitments of a dealing, decoded, if it has the shape a dealing must have in a round
    (SchemaError otherwise): ``threshold`` points, one sealed share for each participant and no
    one else."""
    commitments, shares = body.get("commitments"), body.get("shares")
    if not isinstance(commitments, list) or len(commitments) != threshold:
        raise SchemaError(f"keys.oprf_deal.commitments: expected {threshold} points")
    points = []
    for i, c in enumerate(commitments):
        try:
            points.append(oprf.decode_point(c))
        except CryptoError as exc:
            raise SchemaError(f"keys.oprf_deal.commitments[{i}]: {exc}") from exc
    if not isinstance(shares, dict) or set(shares) != set(participants):
        raise SchemaError("keys.oprf_deal.shares: expected one sealed share for each participant")
    for name, sealed in shares.items():
        if not isinstance(sealed, bytes) or not crypto.SEAL_OVERHEAD < len(sealed) <= crypto.SEAL_OVERHEAD + 32:
            raise SchemaError(f"keys.oprf_deal.shares[{name}]: expected a sealed 32-byte share")
    return points


def round_result(dealings: Mapping[int, Sequence[oprf.PublicKey]], weights: Mapping[int, int],
                 indices: Sequence[int]) -> tuple[dict[int, oprf.PublicKey], oprf.PublicKey]:
    """The public shares ``K_i`` of a round for each participant index, and the group public key,
    from the qualified dealers' commitments (by dealer index) and their weights."""
    public = {}
    for i in indices:
        public[i] = oprf.add([oprf.multiply(committed_value(points, i), weights[d])
                              for d, points in dealings.items()])
    key = oprf.add([oprf.multiply(points[0], weights[d]) for d, points in dealings.items()])
    return public, key


def combined_share(shares: Mapping[int, int], weights: Mapping[int, int]) -> int:
    """A participant's share of a round: the weighted sum of the shares dealt to it (by dealer index)."""
    return sum(s * weights[d] for d, s in shares.items()) % oprf.ORDER
