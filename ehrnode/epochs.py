"""Epoch keys: the consortium's shared keys for envelopes, and how each member gets them.

The chain is divided into epochs. Epoch 0 starts at genesis; each ``keys.epoch``
transaction starts the next one at the block after it commits. An epoch's key
(32 random bytes, made by the member that opens the epoch) reaches every current
member sealed to that member's X25519 key (:func:`ehrnode.crypto.seal_to`), in
genesis for epoch 0 and in the ``keys.epoch`` transaction afterwards. Nothing
else carries it: a member that is not sealed a copy cannot read the epoch.

Each grant also carries a *check value*, an HMAC of a fixed string under the key.
It reveals nothing of the key, and lets each member confirm that the copy sealed
to it is the key everyone else got: a member that could not tell would judge
every envelope of the epoch differently from the others. A copy that does not
open or does not match is reported (and the member stops applying the ledger
at that epoch rather than diverge); the grant's signer is on the chain.

Old epoch keys stay with current members, so history stays readable; a member
that joins later (or replaces its sealing key) gets every earlier key re-sealed
to it in the proposal that admits it (:mod:`ehrnode.ledger.governance`), each copy checked
against its epoch's check value. This module holds them in memory only: they
are derived again at every start from genesis, the ledger state's grants and
the member's own sealing key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import codec, crypto
from .errors import CryptoError

EPOCH_KEY_SIZE = 32
_SEAL_DOMAIN = b"ehrnode/epoch-key/v1"
_CHECK_DOMAIN = b"ehrnode/epoch-key/check/v1"
ENVELOPE_DOMAIN = b"ehrnode/envelope/v1"  # what envelopes are sealed under, bound into their keys and headers


def aead_key(epoch_key: bytes, chain_id: str, epoch: int) -> AESGCM:
    """The AES-256-GCM key an epoch's envelopes use, derived from its epoch key."""
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                       info=ENVELOPE_DOMAIN + codec.encode([chain_id, epoch])).derive(epoch_key))


def _context(chain_id: str, epoch: int) -> bytes:
    return _SEAL_DOMAIN + codec.encode([chain_id, epoch])


def check_value(key: bytes, chain_id: str, epoch: int) -> bytes:
    return hmac.new(key, _CHECK_DOMAIN + codec.encode([chain_id, epoch]), hashlib.sha256).digest()


@dataclass(frozen=True)
class EpochGrant:
    """One epoch's key, as the chain carries it: a check value and a sealed copy per member."""

    epoch: int
    check: bytes
    sealed: Mapping[str, bytes]

    @classmethod
    def create(cls, chain_id: str, epoch: int, recipients: Mapping[str, bytes]) -> EpochGrant:
        """A fresh key for ``epoch``, sealed to each recipient's X25519 public key."""
        key = os.urandom(EPOCH_KEY_SIZE)
        context = _context(chain_id, epoch)
        return cls(epoch, check_value(key, chain_id, epoch),
                   {name: crypto.seal_to(public, key, context) for name, public in sorted(recipients.items())})

    def body(self) -> dict[str, Any]:
        """The body of the ``keys.epoch`` transaction that opens this epoch."""
        return {"epoch": self.epoch, "check": self.check, "sealed": dict(self.sealed)}


class EpochKeys:
    """The epoch keys one member holds, opened with its own sealing key."""

    def __init__(self, chain_id: str, member: str, sealing_key: crypto.SealingKey | None) -> None:
        self.chain_id = chain_id
        self.member = member
        # The member's sealing keys: its key, and the one replacing it during a rotate-key.
        self._sealing_keys = [sealing_key] if sealing_key is not None else []
        self._keys: dict[int, AESGCM] = {}
        self._raw: dict[int, bytes] = {}
        self._checks: dict[int, bytes] = {}
        self._offered: dict[int, list[bytes]] = {}
        #: Epochs whose copy for this member was missing, did not open, or failed its check.
        self.unreadable: dict[int, str] = {}

    def learn(self, grant: EpochGrant) -> bool:
        """Open this member's copy in ``grant`` (or a copy offered for its epoch); False, and the
        reason kept, if none opens to the key the grant's check value commits to."""
        self._checks[grant.epoch] = grant.check
        if grant.epoch in self._keys:
            return True
        copies = [grant.sealed[self.member]] if self.member in grant.sealed else []
        copies += self._offered.get(grant.epoch, [])
        if not copies:
            self.unreadable[grant.epoch] = f"no copy of the epoch {grant.epoch} key is sealed to {self.member}"
            return False
        return any(self._try(grant.epoch, copy) for copy in copies)

    def offer(self, epoch: int, sealed: bytes) -> bool:
        """Another copy of ``epoch``'s key sealed to this member (re-sealed by a member that holds
        it, for a member that joined later or replaced its sealing key). It is only taken if it
        opens to the key the epoch's check value commits to; until that check value is known,
        it is kept and tried when the epoch's grant is learnt."""
        if epoch in self._keys:
            return True
        if epoch not in self._checks:
            self._offered.setdefault(epoch, []).append(sealed)
            return False
        return self._try(epoch, sealed)

    def _try(self, epoch: int, sealed: bytes) -> bool:
        try:
            if not self._sealing_keys:
                raise CryptoError(f"{self.member} has no sealing key to open the epoch {epoch} key with")
            key = self._open(sealed, epoch)
            if not hmac.compare_digest(check_value(key, self.chain_id, epoch), self._checks[epoch]):
                raise CryptoError(f"the epoch {epoch} key sealed to {self.member} is not the key its "
                                  "check value commits to")
        except CryptoError as exc:
            self.unreadable[epoch] = str(exc)
            return False
        self.unreadable.pop(epoch, None)
        self._offered.pop(epoch, None)
        self._keys[epoch] = aead_key(key, self.chain_id, epoch)
        self._raw[epoch] = key
        return True

    def add_sealing_key(self, sealing_key: crypto.SealingKey) -> None:
        """Also open copies sealed to ``sealing_key`` (the member's next key, during a rotate-key)."""
        self._sealing_keys.append(sealing_key)

    def _open(self, sealed: bytes, epoch: int) -> bytes:
        error: CryptoError | None = None
        for sealing_key in self._sealing_keys:
            try:
                return sealing_key.open(sealed, _context(self.chain_id, epoch))
            except CryptoError as exc:
                error = exc
        assert error is not None
        raise error

    def reseal(self, epoch: int, public_key: bytes) -> bytes | None:
        """This member's copy of ``epoch``'s key sealed to another member's ``public_key``
        (None if it does not hold it)."""
        key = self._raw.get(epoch)
        return None if key is None else crypto.seal_to(public_key, key, _context(self.chain_id, epoch))

    def history_for(self, public_key: bytes, epochs: int) -> list[bytes]:
        """The keys of epochs 0 to ``epochs - 1`` sealed to ``public_key``: what an add or rotate-key
        proposal carries (raises CryptoError if this member lacks one of them)."""
        missing = [e for e in range(epochs) if e not in self._raw]
        if missing:
            raise CryptoError(f"{self.member} does not hold the key of epoch {missing[0]}")
        return [crypto.seal_to(public_key, self._raw[e], _context(self.chain_id, e)) for e in range(epochs)]

    def aead(self, epoch: int) -> AESGCM | None:
        return self._keys.get(epoch)

    def __contains__(self, epoch: int) -> bool:
        return epoch in self._keys

    @property
    def epochs(self) -> list[int]:
        return sorted(self._keys)
