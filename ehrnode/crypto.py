"""Identities, signatures and hashes.

An institution is known by its Ed25519 public key (listed in genesis). Every
signature is over a domain-separated message (:func:`signing_bytes`) so a
signature made for one purpose can never be replayed as another. Ids are
SHA-256 over canonical CBOR.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import codec
from .errors import CryptoError

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
DIGEST_SIZE = 32


class MemberKeys:
    """A member's current signing identity and sealing key, one object shared by everything that
    signs or opens for the member (the recorder, the vault, pulls, whois). When the consortium
    adopts the member's new keys they are replaced here, once, and every holder uses them from
    its next signature on."""

    def __init__(self, identity: Identity, sealing_key: SealingKey) -> None:
        self.identity = identity
        self.sealing_key = sealing_key

    def replace(self, identity: Identity, sealing_key: SealingKey) -> None:
        self.identity, self.sealing_key = identity, sealing_key


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def signing_bytes(domain: str, value: object) -> bytes:
    """The exact bytes signed for ``value`` under ``domain`` (e.g. ``"ehrnode/vote/v1"``)."""
    return codec.encode([domain, value])


class Identity:
    """A member's Ed25519 signing key. Never leaves the node."""

    __slots__ = ("_key", "public_key")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key: bytes = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A deterministic identity from 32 bytes (simulator and tests)."""
        if len(seed) != 32:
            raise CryptoError("an Ed25519 seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, message: bytes, *, remember: bool = True) -> bytes:
        """Sign ``message``. With ``remember``, the signature goes into the cache of verified
        signatures, so this node checking its own signature later (its pull request in an owner's
        access log, its vote in a certificate, its own transaction in a block) costs a lookup;
        signatures it never checks itself (vault entries, handshakes) need not take the room."""
        signature = self._key.sign(message)
        if remember:
            remember_valid(self.public_key, message, signature)
        return signature

    def save(self, path: Path) -> None:
        """Write the key as PKCS#8 PEM, mode 0600; refuses to overwrite an existing file."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_secret_file(path, pem)

    @classmethod
    def load(cls, path: Path) -> Identity:
        return cls(_load_private_key(path, Ed25519PrivateKey, "Ed25519"))


class SealingKey:
    """A member's X25519 key: what peers seal data to (records served to this member)."""

    __slots__ = ("_key", "public_key")

    def __init__(self, key: X25519PrivateKey) -> None:
        self._key = key
        self.public_key: bytes = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> SealingKey:
        return cls(X25519PrivateKey.generate())

    def save(self, path: Path) -> None:
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_secret_file(path, pem)

    @classmethod
    def load(cls, path: Path) -> SealingKey:
        return cls(_load_private_key(path, X25519PrivateKey, "X25519"))

    def open(self, sealed: bytes, context: bytes) -> bytes:
        """Reverse :func:`seal_to` (raises CryptoError: not for this key, another context, or changed)."""
        if len(sealed) < SEAL_OVERHEAD:
            raise CryptoError("sealed data too short")
        ephemeral = sealed[:PUBLIC_KEY_SIZE]
        try:
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(ephemeral))
        except ValueError as exc:
            raise CryptoError(f"sealed data has a bad ephemeral key: {exc}") from exc
        key = _seal_key(shared, ephemeral, self.public_key, context)
        nonce = sealed[PUBLIC_KEY_SIZE:PUBLIC_KEY_SIZE + 12]
        try:
            return AESGCM(key).decrypt(nonce, sealed[PUBLIC_KEY_SIZE + 12:], context)
        except InvalidTag as exc:
            raise CryptoError("sealed data does not open: changed, or sealed to another key") from exc


SEAL_DOMAIN = b"ehrnode/seal/v1"
#: Ephemeral public key, nonce and tag.
SEAL_OVERHEAD = PUBLIC_KEY_SIZE + 12 + 16


def _seal_key(shared: bytes, ephemeral: bytes, recipient: bytes, context: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient,
                info=SEAL_DOMAIN + context).derive(shared)


def seal_to(public_key: bytes, plaintext: bytes, context: bytes) -> bytes:
    """Encrypt ``plaintext`` so only the holder of the X25519 key ``public_key`` can read it.

    An ephemeral X25519 exchange, HKDF-SHA256 and AES-256-GCM; ``context`` (a request id,
    say) is bound in, so a sealed answer cannot be passed off as the answer to another request.
    """
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(public_key))
    except ValueError as exc:
        raise CryptoError(f"cannot seal to that key: {exc}") from exc
    key = _seal_key(shared, ephemeral_public, public_key, context)
    nonce = os.urandom(12)
    return ephemeral_public + nonce + AESGCM(key).encrypt(nonce, plaintext, context)


def _load_private_key(path: Path, kind: type, name: str) -> Any:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise CryptoError(f"cannot read key file {path}: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:
        raise CryptoError(f"{path} is not a PEM private key: {exc}") from exc
    if not isinstance(key, kind):
        raise CryptoError(f"{path} holds a {type(key).__name__}, not an {name} key")
    return key


def write_secret_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never wider, whatever the umask) and fsync it."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise CryptoError(f"refusing to overwrite existing key file {path}") from exc
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


@lru_cache(maxsize=1024)
def _public_key(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


class _VerifiedCache:
    """Remembers signatures that verified, so a message gossiped back is not checked again.

    Verification is the CPU budget of a validator (about 9k/s per core); only
    successes are cached, keyed by a digest of key, message and signature, so a
    bad signature can never be served from here.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        # Records are signed in a worker thread while the event loop verifies.
        self._lock = threading.Lock()

    def check(self, key: bytes) -> bool:
        with self._lock:
            if key in self._seen:
                self._seen.move_to_end(key)
                return True
            return False

    def add(self, key: bytes) -> None:
        with self._lock:
            self._seen[key] = None
            if len(self._seen) > self.capacity:
                self._seen.popitem(last=False)


_verified = _VerifiedCache(65536)


def set_verify_cache(capacity: int) -> None:
    """Resize the cache of verified signatures (0 turns it off: every check is done in full)."""
    global _verified
    _verified = _VerifiedCache(capacity)


def remember_valid(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Record a signature this process just made (:meth:`Identity.sign` does), so verifying it
    later costs a lookup."""
    if _verified.capacity:
        _verified.add(hashlib.sha256(public_key + signature + message).digest())


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s signature of ``message``."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    key = hashlib.sha256(public_key + signature + message).digest()
    if _verified.capacity and _verified.check(key):
        return True
    try:
        _public_key(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    if _verified.capacity:
        _verified.add(key)
    return True
