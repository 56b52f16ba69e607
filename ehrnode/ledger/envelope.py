"""Envelopes: the sealed form every transaction takes on the wire and in blocks.

A signed transaction (:mod:`.transactions`) is padded to a size bucket and
encrypted with AES-256-GCM under the key of a consortium *epoch*
(:mod:`.epochs`). What stays readable is only what routing and accountability
need, bound into the AEAD as associated data:

``{"v": 1, "class", "epoch", "signer", "nonce", "ct"}``

- ``class``: the kind's class (``record``, ``empi``, ``consent``, ``access``,
  ``whois``, ``chain``, ``consortium``), not the kind itself;
- ``epoch``: which epoch key opens it;
- ``signer``: the member that signed the transaction inside (checked against it
  once opened), so a flood can be attributed without any key;
- the size of ``ct``: one of a few buckets, never the transaction's own size.

A copy of a block store, a backup or a relay therefore holds no EMPI, record
id, enrolment, purpose or user pseudonym in clear. The one exception is the
``consortium`` class (membership proposals and votes, epoch key grants): it is
sealed under a key derived from the chain id (:func:`public_key`), because a
member that joins later must read it before it holds any epoch key, and it
holds only what genesis already publishes (names, public keys, addresses) and
keys sealed to each member. Every current member holds
the epoch keys, opens every envelope and validates and indexes what is inside.

An envelope's id (SHA-256 of its bytes) is what consensus and the mempool track;
the transaction's own id (SHA-256 of the signed transaction) is what the ledger
records and every other transaction refers to, so the same transaction sealed
twice is still one transaction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property, lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .. import codec, crypto
from ..codec import as_bytes, as_map, as_str, as_uint
from ..config import LEDGER_RULES
from ..epochs import ENVELOPE_DOMAIN, aead_key
from ..errors import CodecError, CryptoError, SchemaError
from .transactions import KINDS, MAX_TX_BYTES, Transaction

VERSION = 1
NONCE_SIZE = 12
TAG_SIZE = 16
#: Padded sizes of a transaction inside an envelope: powers of two from 256 bytes, and a last
#: bucket for the largest transactions. An envelope reveals only which bucket it is in.
SIZE_BUCKETS = tuple(256 << i for i in range(8)) + (MAX_TX_BYTES + 1,)
#: Bucket, tag and the clear fields: within the 64 KiB a block or gossip frame allows per entry.
MAX_ENVELOPE_BYTES = 64 * 1024

_CLASSES = {"note": "chain", "record.anchor": "record", "record.anchors": "record", "record.erase": "record",
            "integrity.alert": "record",
            "consent.grant": "consent", "consent.revoke": "consent", "access.log": "access", "access.logs": "access",
            "whois.request": "whois", "whois.answer": "whois", "keys.epoch": "consortium",
            "consortium.propose": "consortium", "consortium.vote": "consortium", "keys.request": "consortium",
            "keys.reseal": "consortium", "keys.oprf_deal": "consortium", "keys.oprf_verdict": "consortium",
            "keys.oprf_reveal": "consortium", "keys.oprf_close": "consortium"}
#: Classes sealed under a key every holder of the genesis file can derive: what a member that
#: joins later, and holds no epoch key yet, must read to follow the consortium (who its members
#: are, and the epoch keys sealed to each). Nothing in them is about patients or users.
PUBLIC_CLASSES = frozenset({"consortium"})
_PUBLIC_DOMAIN = b"ehrnode/public-envelope/v1"


def kind_class(kind: str) -> str:
    """The class an envelope shows for a transaction of ``kind``."""
    if kind.startswith("empi."):
        return "empi"
    return _CLASSES[kind]


CLASSES = frozenset(kind_class(k) for k in KINDS)


_MIX_DOMAIN = b"ehrnode/mix/v1"


def mix(entries: list[bytes], seed: bytes) -> list[bytes]:
    """The order a leader puts its block's envelopes in: a random interleaving, drawn from
    ``seed``, that keeps each signer's own transactions in the order they came.

    Arrival order across members (who reacted to whom, and when) is not written into the
    block; a member's own sequence (an enrolment before the anchors that name it) is kept.
    """
    signers: list[str] = []
    queues: dict[str, list[bytes]] = {}
    for data in entries:
        try:
            signer = Envelope.decode(data).signer
        except CodecError:
            signer = ""  # invalid anyway; it goes where its draw puts it
        signers.append(signer)
        queues.setdefault(signer, []).append(data)
    draws = sorted(range(len(entries)), key=lambda i: crypto.sha256(_MIX_DOMAIN + seed + crypto.sha256(entries[i])))
    # Slot k goes to the signer of the k-th draw, which takes its next entry in arrival order.
    taken = dict.fromkeys(queues, 0)
    ordered = []
    for i in draws:
        signer = signers[i]
        ordered.append(queues[signer][taken[signer]])
        taken[signer] += 1
    return ordered


def bucket(size: int) -> int:
    """The padded size for a transaction of ``size`` bytes (one byte of padding at least)."""
    for limit in SIZE_BUCKETS:
        if size < limit:
            return limit
    raise SchemaError(f"transaction of {size} bytes exceeds {MAX_TX_BYTES}")


def _pad(data: bytes) -> bytes:
    # ISO/IEC 7816-4: a 0x80 byte, then zeros to the bucket.
    return data + b"\x80" + bytes(bucket(len(data)) - len(data) - 1)


def _unpad(data: bytes) -> bytes:
    end = data.rfind(b"\x80")
    if end < 0 or any(data[end + 1:]) or len(data) not in SIZE_BUCKETS:
        raise CodecError("envelope: bad padding", reason="malformed")
    return data[:end]


def public_key(chain_id: str, epoch: int) -> AESGCM:
    """The key of public-class envelopes: derived from the chain id alone, so it hides nothing;
    the envelope keeps one format, and the class, epoch and signer stay bound in."""
    return aead_key(crypto.sha256(_PUBLIC_DOMAIN + chain_id.encode()), chain_id, epoch)


@lru_cache(maxsize=1024)
def _associated(chain_id: str, kind_class: str, epoch: int, signer: str) -> bytes:
    """The clear fields an envelope's AEAD binds in (a handful of signers, classes and epochs)."""
    return codec.encode([ENVELOPE_DOMAIN, chain_id, kind_class, epoch, signer])


@dataclass(frozen=True)
class Envelope:
    kind_class: str
    epoch: int
    signer: str
    nonce: bytes
    ciphertext: bytes

    @cached_property
    def encoded(self) -> bytes:
        return codec.encode({"v": VERSION, "class": self.kind_class, "epoch": self.epoch, "signer": self.signer,
                             "nonce": self.nonce, "ct": self.ciphertext})

    @cached_property
    def id(self) -> bytes:
        return crypto.sha256(self.encoded)

    def _associated(self, chain_id: str) -> bytes:
        return _associated(chain_id, self.kind_class, self.epoch, self.signer)

    @classmethod
    def seal(cls, tx: Transaction, *, epoch: int, key: AESGCM, chain_id: str) -> Envelope:
        shell = cls(kind_class(tx.kind), epoch, tx.submitter, os.urandom(NONCE_SIZE), b"")
        ciphertext = key.encrypt(shell.nonce, _pad(tx.encoded), shell._associated(chain_id))
        return cls(shell.kind_class, epoch, tx.submitter, shell.nonce, ciphertext)

    @classmethod
    def decode(cls, data: bytes) -> Envelope:
        """Strictly decode ``data`` (raises CodecError/SchemaError); opens nothing."""
        if len(data) > MAX_ENVELOPE_BYTES:
            raise CodecError(f"envelope of {len(data)} bytes exceeds {MAX_ENVELOPE_BYTES}", reason="too_large")
        m = as_map(codec.decode(data, max_size=MAX_ENVELOPE_BYTES), "envelope",
                   ("v", "class", "epoch", "signer", "nonce", "ct"))
        if m["v"] != VERSION:
            raise SchemaError(f"envelope.v: version {m['v']!r} is not {VERSION}")
        kind = as_str(m["class"], "envelope.class", max_len=16)
        if kind not in CLASSES:
            raise SchemaError(f"envelope.class: unknown class {kind!r}")
        ciphertext = as_bytes(m["ct"], "envelope.ct", max_len=MAX_ENVELOPE_BYTES)
        if len(ciphertext) - TAG_SIZE not in SIZE_BUCKETS:
            raise SchemaError("envelope.ct: not the size of a bucket")
        envelope = cls(kind, as_uint(m["epoch"], "envelope.epoch"), as_str(m["signer"], "envelope.signer", max_len=32),
                       as_bytes(m["nonce"], "envelope.nonce", size=NONCE_SIZE), ciphertext)
        envelope.__dict__["encoded"] = data  # canonical: the decoder checked
        return envelope

    def open(self, key: AESGCM, chain_id: str, rules: int = LEDGER_RULES) -> Transaction:
        """The transaction inside, checked against the clear fields.

        Raises CryptoError if it does not open under ``key`` (sealed under another key,
        or changed), CodecError/SchemaError if what is inside is not a transaction of
        this signer and class.
        """
        try:
            padded = key.decrypt(self.nonce, self.ciphertext, self._associated(chain_id))
        except InvalidTag as exc:
            raise CryptoError("envelope does not open under its epoch's key") from exc
        tx = Transaction.decode(_unpad(padded), rules)
        if tx.submitter != self.signer or kind_class(tx.kind) != self.kind_class:
            raise SchemaError("envelope: the transaction inside does not match its signer or class",
                              reason="envelope_mismatch")
        return tx
