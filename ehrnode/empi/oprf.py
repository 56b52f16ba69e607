"""The consortium's threshold OPRF: values every member can pseudonymize, none alone.

Theory of operation
-------------------
The EMPI's exact-equality encodings (a national-id pseudonym, a blocking key) must
be equal at every member that holds the same value, yet no member may be able to
compute one on its own: whoever can compute them offline can test guesses ("is
this SSN a patient anywhere?") against every enrolment on the chain. So they come
from an oblivious pseudorandom function under a key ``k`` that no member holds
(2HashDH, Jarecki et al.)::

    F_k(x) = H2(x, k * H1(x))

``H1`` hashes into the group (secp256k1, prime order), ``H2`` is SHA-256. ``k`` is
Shamir-shared among the institutions (:mod:`ehrnode.empi.dkg`): member ``i`` holds
``k_i = f(i)`` for a random polynomial ``f`` of degree ``t - 1`` with ``f(0) = k``,
and everyone knows the public shares ``K_i = k_i * G``.

A member that wants ``F_k(x)``:

1. **blinds**: picks a random scalar ``r`` and sends ``B = r * H1(x)``, a uniformly
   random point that says nothing of ``x``;
2. each of ``t`` members **evaluates** ``E_i = k_i * B`` and proves, with one
   batched Chaum-Pedersen proof per answer, that it used the ``k_i`` behind ``K_i``
   (a member that answers with anything else is caught, not believed);
3. the requester **combines** and unblinds at once:
   ``k * H1(x) = sum_i (lambda_i / r) * E_i``, with ``lambda_i`` the Lagrange
   coefficients of the answering set at 0, and hashes the result with ``x``.

Fewer than ``t`` members together learn nothing of ``k``; evaluating members see
only random points. The group arithmetic is libsecp256k1's (through coincurve);
what is done here with Python integers is Shamir's arithmetic on scalars modulo
the group order: Lagrange coefficients, polynomial values and the proofs' responses.

``H1`` is try-and-increment: the first SHA-256 of a counter and the input that is
the x-coordinate of a curve point (two tries on average). Its time depends on the
input, which only the requester (who holds the input anyway) computes.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from coincurve import PublicKey

from ..errors import CryptoError

#: The order of secp256k1's group: scalars are integers modulo it.
ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
#: The field prime; an x-coordinate is below it.
_FIELD = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEFFFFFC2F
POINT_BYTES = 33
SCALAR_BYTES = 32
OUTPUT_BYTES = 32
_DOMAIN = b"ehrnode/oprf/v1/"
GENERATOR = PublicKey.from_secret((1).to_bytes(SCALAR_BYTES, "big"))


def scalar_bytes(value: int) -> bytes:
    return (value % ORDER).to_bytes(SCALAR_BYTES, "big")


def random_scalar() -> int:
    """A uniformly random nonzero scalar."""
    return 1 + secrets.randbelow(ORDER - 1)


def hash_to_scalar(*parts: bytes) -> int:
    """A scalar from SHA-512 of length-prefixed parts (the bias from 512 bits mod ORDER is negligible)."""
    digest = hashlib.sha512()
    for part in parts:
        digest.update(len(part).to_bytes(4, "big") + part)
    return int.from_bytes(digest.digest(), "big") % ORDER


def decode_point(data: object, what: str = "point") -> PublicKey:
    """A group element from its 33-byte compressed form; CryptoError if it is not one."""
    if not isinstance(data, bytes) or len(data) != POINT_BYTES or data[0] not in (2, 3):
        raise CryptoError(f"{what}: expected a {POINT_BYTES}-byte compressed secp256k1 point")
    try:
        return PublicKey(data)
    except ValueError as exc:
        raise CryptoError(f"{what}: not a point on secp256k1") from exc


def encode_point(point: PublicKey) -> bytes:
    return point.format(compressed=True)


def multiply(point: PublicKey, scalar: int) -> PublicKey:
    """``scalar * point``; the scalar must not be 0 modulo the order (it never is here but by
    an adversary's choice, which is refused)."""
    scalar %= ORDER
    if scalar == 0:
        raise CryptoError("multiplication by zero")
    return point.multiply(scalar.to_bytes(SCALAR_BYTES, "big"))


def base_multiply(scalar: int) -> PublicKey:
    scalar %= ORDER
    if scalar == 0:
        raise CryptoError("multiplication by zero")
    return PublicKey.from_secret(scalar.to_bytes(SCALAR_BYTES, "big"))


def add(points: Sequence[PublicKey]) -> PublicKey:
    """The sum of points; CryptoError if it is the identity (which has no encoding)."""
    try:
        return PublicKey.combine_keys(list(points))
    except ValueError as exc:
        raise CryptoError("the points sum to the identity") from exc


def hash_to_group(value: bytes) -> PublicKey:
    """``H1``: a point that nobody knows the discrete logarithm of, from any input."""
    for counter in range(256):
        x = hashlib.sha256(_DOMAIN + b"h1" + counter.to_bytes(1, "big") + value).digest()
        if int.from_bytes(x, "big") >= _FIELD:
            continue
        try:
            return PublicKey(b"\x02" + x)
        except ValueError:
            continue
    raise CryptoError("no point found for the value")       # probability 2^-256


def output(value: bytes, evaluated: PublicKey) -> bytes:
    """``H2``: the OPRF output for ``value`` from ``k * H1(value)``."""
    return hashlib.sha256(_DOMAIN + b"h2" + len(value).to_bytes(4, "big") + value
                          + encode_point(evaluated)).digest()


def evaluate_locally(key: int, value: bytes) -> bytes:
    """``F_k(value)`` with the whole key in hand: only tests and the key's proof of concept use it;
    no member ever holds ``k``."""
    return output(value, multiply(hash_to_group(value), key))


@dataclass(frozen=True)
class Blinded:
    """A value prepared for evaluation: what is sent (``point``) and what stays (``value``, ``r``)."""

    value: bytes
    r: int
    point: PublicKey


def blind(value: bytes) -> Blinded:
    r = random_scalar()
    return Blinded(value, r, multiply(hash_to_group(value), r))


def lagrange_at_zero(indices: Iterable[int], i: int) -> int:
    """The Lagrange coefficient of share ``i`` for interpolating at 0 from ``indices`` (mod ORDER)."""
    numerator, denominator = 1, 1
    for j in indices:
        if j != i:
            numerator = numerator * j % ORDER
            denominator = denominator * (j - i) % ORDER
    return numerator * pow(denominator, -1, ORDER) % ORDER


def combine(blinded: Sequence[Blinded], answers: Mapping[int, Sequence[PublicKey]],
            own: tuple[int, int] | None = None) -> list[bytes]:
    """The OPRF outputs of blinded values, from ``t`` members' evaluations keyed by share index.

    The answers must already be verified (:func:`verify`); each is the list of ``k_i * B`` in
    the order of ``blinded``. ``own`` is the requester's (index, share) when it holds one: its
    part is computed here, folded into the same multiplication. Interpolation and unblinding
    are one multiplication per share.
    """
    indices = sorted(set(answers) | ({own[0]} if own else set()))
    if not indices:
        raise CryptoError("no evaluations to combine")
    weights = {i: lagrange_at_zero(indices, i) for i in indices}
    out = []
    for n, item in enumerate(blinded):
        inverse = pow(item.r, -1, ORDER)
        terms = [multiply(answers[i][n], weights[i] * inverse) for i in indices if i in answers]
        if own is not None:
            terms.append(multiply(item.point, weights[own[0]] * own[1] % ORDER * inverse))
        out.append(output(item.value, add(terms)))
    return out


# -- proofs: one batched Chaum-Pedersen proof that every E_n = k_i * B_n, for K_i = k_i * G ------------

PROOF_BYTES = 2 * SCALAR_BYTES


def _weights(public: PublicKey, points: Sequence[PublicKey], evaluated: Sequence[PublicKey],
             context: bytes) -> list[int]:
    """The weights ``d_n`` of the random linear combinations, hashed from everything, so a proof
    for the combination covers every pair."""
    seed = hash_to_scalar(_DOMAIN + b"composite", context, encode_point(public),
                          *(encode_point(p) for p in points), *(encode_point(e) for e in evaluated))
    return [hash_to_scalar(seed.to_bytes(SCALAR_BYTES, "big"), n.to_bytes(4, "big")) or 1
            for n in range(len(points))]


def _composites(public: PublicKey, points: Sequence[PublicKey], evaluated: Sequence[PublicKey],
                context: bytes) -> tuple[PublicKey, PublicKey] | None:
    """``M = sum d_n B_n`` and ``Z = sum d_n E_n`` (or None: nothing to prove)."""
    if not points:
        return None
    weights = _weights(public, points, evaluated, context)
    m = add([multiply(p, d) for p, d in zip(points, weights, strict=True)])
    z = add([multiply(e, d) for e, d in zip(evaluated, weights, strict=True)])
    return m, z


def _challenge(public: PublicKey, m: PublicKey, z: PublicKey, t1: PublicKey, t2: PublicKey,
               context: bytes) -> int:
    return hash_to_scalar(_DOMAIN + b"challenge", context, encode_point(public), encode_point(m),
                          encode_point(z), encode_point(t1), encode_point(t2))


def evaluate(share: int, points: Sequence[PublicKey], context: bytes) -> tuple[list[PublicKey], bytes]:
    """A member's answer to a batch: ``k_i * B`` for each point, and the proof for them all.

    ``context`` (the requester, the batch id) is bound into the proof, so an answer cannot be
    replayed as the answer to another batch.
    """
    evaluated = [multiply(p, share) for p in points]
    public = base_multiply(share)
    if not points:
        return evaluated, b""
    # The prover knows k_i: Z = k_i * M, one multiplication instead of one per value.
    weights = _weights(public, points, evaluated, context)
    m = add([multiply(p, d) for p, d in zip(points, weights, strict=True)])
    z = multiply(m, share)
    while True:
        nonce = random_scalar()
        t1, t2 = base_multiply(nonce), multiply(m, nonce)
        c = _challenge(public, m, z, t1, t2, context)
        s = (nonce - c * share) % ORDER
        if s and c:
            return evaluated, scalar_bytes(c) + scalar_bytes(s)


def verify(public: PublicKey, points: Sequence[PublicKey], evaluated: Sequence[PublicKey], proof: bytes,
           context: bytes) -> bool:
    """Whether ``evaluated`` are ``k_i * points`` for the ``k_i`` behind ``public`` (the member's
    public share)."""
    if len(points) != len(evaluated):
        return False
    composites = _composites(public, points, evaluated, context)
    if composites is None:
        return proof == b""
    if len(proof) != PROOF_BYTES:
        return False
    c, s = int.from_bytes(proof[:SCALAR_BYTES], "big"), int.from_bytes(proof[SCALAR_BYTES:], "big")
    if not 0 < c < ORDER or not 0 < s < ORDER:
        return False
    m, z = composites
    try:
        t1 = add([base_multiply(s), multiply(public, c)])
        t2 = add([multiply(m, s), multiply(z, c)])
    except CryptoError:
        return False
    return _challenge(public, m, z, t1, t2, context) == c
