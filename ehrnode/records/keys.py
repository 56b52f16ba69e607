"""The symmetric secrets behind records, and sealing with them.

Two secret files, 32 random bytes each, mode 0600:

``master.key``
    This institution's own secret. Never leaves the node (backups carry it
    encrypted). Every key records use is derived from it with HKDF under a
    label, so one file backs them all and no two uses share a key:
    ``wrap`` (wraps each vault entry's data keys), ``deid`` (pseudonyms and
    date-shift offsets), ``patients`` (the patient table) and ``index``
    (lookup keys of the patient table).
``consortium.key``
    Shared by every member: the EMPI pseudonym key, so that two institutions
    holding the same national identifier derive the same EMPI without showing
    each other the identifier.

Data is sealed with AES-256-GCM under a fresh 96-bit nonce; the associated
data binds a ciphertext to where it belongs (a record id and a role), so a
ciphertext moved to another row does not decrypt.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .. import crypto
from ..errors import ConfigError, IntegrityError

SECRET_SIZE = 32
NONCE_SIZE = 12
_LABELS = ("wrap", "deid", "patients", "index")


def create_secret(path: Path) -> None:
    """Write a new random secret to ``path`` (0600); refuses to overwrite (raises CryptoError)."""
    crypto.write_secret_file(path, os.urandom(SECRET_SIZE))


def load_secret(path: Path, what: str) -> bytes:
    """Read a 32-byte secret file; a missing, unreadable or wrong-sized file raises ConfigError."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    if len(raw) != SECRET_SIZE:
        raise ConfigError(f"{what} {path} must hold {SECRET_SIZE} bytes, not {len(raw)}")
    return raw


def _derive(master: bytes, label: str) -> bytes:
    return HKDF(hashes.SHA256(), SECRET_SIZE, salt=None, info=b"ehrnode/records/" + label.encode()).derive(master)


@dataclass(frozen=True)
class RecordKeys:
    wrap: bytes
    deid: bytes
    patients: bytes
    index: bytes
    consortium: bytes

    @classmethod
    def derive(cls, master: bytes, consortium: bytes) -> RecordKeys:
        wrap, deid, patients, index = (_derive(master, label) for label in _LABELS)
        return cls(wrap, deid, patients, index, consortium)

    @classmethod
    def load(cls, master_path: Path, consortium_path: Path) -> RecordKeys:
        return cls.derive(load_secret(master_path, "master key"), load_secret(consortium_path, "consortium key"))

    def lookup(self, *parts: str) -> bytes:
        """A keyed lookup value for the patient table (equal inputs, equal outputs; reveals nothing)."""
        return hmac.new(self.index, "\x1f".join(parts).encode(), hashlib.sha256).digest()


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """``nonce || AES-256-GCM(key, plaintext, aad)``."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, sealed: bytes, aad: bytes, what: str) -> bytes:
    """Reverse :func:`seal`; a wrong key, changed bytes or another row's ciphertext raise IntegrityError."""
    if len(sealed) < NONCE_SIZE + 16:
        raise IntegrityError(f"{what}: ciphertext too short", reason="truncated")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], aad)
    except InvalidTag as exc:
        raise IntegrityError(f"{what}: authentication failed (changed bytes or wrong key)",
                             reason="bad_tag") from exc


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)

