"""The pull messages: a signed request, and the owner's answer in one or more parts.

A request is the canonical CBOR of ``{chain, requester, owner, record,
purpose, nonce, time, sig}``; ``sig`` is the requester's Ed25519 signature
over the rest under its own domain tag, and the request's id is the SHA-256
of its bytes. The id is what the owner's ``access.log`` names, so the chain
ties each decision to exactly one signed request.

An answer names the request it answers and has a ``status``:

``served``       ``data`` is the release sealed to the requester's X25519 key
                 (:func:`ehrnode.crypto.seal_to`, bound to the request id),
                 cut into parts of at most :data:`PART_BYTES`
``refused``      the owner decided no; ``access`` is the committed access log
``rejected``     the request itself was not acceptable (bad signature, stale,
                 replayed, malformed, busy): nothing went on chain
``unavailable``  the owner could not decide or serve now (its access log did not
                 commit in time, its vault failed)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .. import codec, crypto
from ..codec import as_bytes, as_map, as_str, as_uint
from ..errors import CodecError, SchemaError
from ..ledger.transactions import CONSENT_PURPOSES

PULL_DOMAIN = "ehrnode/pull/v1"
MAX_REQUEST_BYTES = 1024
#: Sealed release bytes per answer part (an answer frame stays well inside the 8 MiB frame).
PART_BYTES = 4 * 1024 * 1024
MAX_PARTS = 16
STATUSES = ("served", "refused", "rejected", "unavailable")
NONCE_SIZE = 16


@dataclass(frozen=True)
class PullRequest:
    chain_id: str
    requester: str
    owner: str
    record: bytes
    purpose: str
    nonce: bytes
    time: int
    signature: bytes

    def _unsigned(self) -> dict[str, Any]:
        return {"chain": self.chain_id, "requester": self.requester, "owner": self.owner, "record": self.record,
                "purpose": self.purpose, "nonce": self.nonce, "time": self.time}

    @classmethod
    def create(cls, *, chain_id: str, requester: str, owner: str, record: bytes, purpose: str, time_ms: int,
               identity: crypto.Identity) -> PullRequest:
        unsigned = cls(chain_id, requester, owner, record, purpose, os.urandom(NONCE_SIZE), time_ms, b"")
        signature = identity.sign(crypto.signing_bytes(PULL_DOMAIN, unsigned._unsigned()))
        return cls(chain_id, requester, owner, record, purpose, unsigned.nonce, time_ms, signature)

    def encode(self) -> bytes:
        return codec.encode({**self._unsigned(), "sig": self.signature})

    @classmethod
    def decode(cls, data: bytes) -> PullRequest:
        """Strictly decode (raises CodecError/SchemaError)."""
        if len(data) > MAX_REQUEST_BYTES:
            raise CodecError(f"pull request of {len(data)} bytes", reason="too_large")
        m = as_map(codec.decode(data, max_size=MAX_REQUEST_BYTES), "pull",
                   ("chain", "requester", "owner", "record", "purpose", "nonce", "time", "sig"))
        purpose = as_str(m["purpose"], "pull.purpose", max_len=16)
        if purpose not in CONSENT_PURPOSES:
            raise SchemaError(f"pull.purpose: one of {', '.join(CONSENT_PURPOSES)}")
        return cls(
            as_str(m["chain"], "pull.chain", max_len=64), as_str(m["requester"], "pull.requester", max_len=32),
            as_str(m["owner"], "pull.owner", max_len=32), as_bytes(m["record"], "pull.record", size=16), purpose,
            as_bytes(m["nonce"], "pull.nonce", size=NONCE_SIZE), as_uint(m["time"], "pull.time"),
            as_bytes(m["sig"], "pull.sig", size=crypto.SIGNATURE_SIZE),
        )

    def signature_ok(self, public_key: bytes) -> bool:
        return crypto.verify(public_key, crypto.signing_bytes(PULL_DOMAIN, self._unsigned()), self.signature)


def request_id(data: bytes) -> bytes:
    return crypto.sha256(data)


@dataclass(frozen=True)
class PullAnswer:
    request: bytes
    status: str
    reason: str
    message: str
    access: bytes = b""  # the access.log transaction id (empty when nothing went on chain)
    part: int = 0
    parts: int = 1
    data: bytes = b""

    def encode(self) -> bytes:
        return codec.encode({"request": self.request, "status": self.status, "reason": self.reason,
                             "message": self.message, "access": self.access, "part": self.part,
                             "parts": self.parts, "data": self.data})

    @classmethod
    def decode(cls, data: bytes) -> PullAnswer:
        m = as_map(codec.decode(data, max_size=PART_BYTES + 2048), "pull answer",
                   ("request", "status", "reason", "message", "access", "part", "parts", "data"))
        status = as_str(m["status"], "answer.status", max_len=16)
        if status not in STATUSES:
            raise SchemaError(f"answer.status: one of {', '.join(STATUSES)}")
        access = as_bytes(m["access"], "answer.access", max_len=32)
        if len(access) not in (0, 32):
            raise SchemaError("answer.access: a transaction id or empty")
        parts = as_uint(m["parts"], "answer.parts")
        part = as_uint(m["part"], "answer.part")
        if not 1 <= parts <= MAX_PARTS or part >= parts:
            raise SchemaError(f"answer.part: {part} of {parts} (at most {MAX_PARTS} parts)")
        return cls(as_bytes(m["request"], "answer.request", size=32), status,
                   as_str(m["reason"], "answer.reason", max_len=32), as_str(m["message"], "answer.message",
                                                                          max_len=512),
                   access, part, parts, as_bytes(m["data"], "answer.data", max_len=PART_BYTES))


def split_served(request: bytes, sealed: bytes, access: bytes) -> list[PullAnswer]:
    """A sealed release as answer parts (raises SchemaError when it would need too many)."""
    chunks = [sealed[i:i + PART_BYTES] for i in range(0, len(sealed), PART_BYTES)] or [b""]
    if len(chunks) > MAX_PARTS:
        raise SchemaError(f"release of {len(sealed)} bytes exceeds {MAX_PARTS * PART_BYTES} bytes")
    return [PullAnswer(request, "served", "granted", "", access, i, len(chunks), chunk)
            for i, chunk in enumerate(chunks)]


def release_payload(record: bytes, resource: bytes, salt: bytes) -> bytes:
    """What is sealed: the record id, the release's canonical JSON bytes and its salt."""
    return codec.encode({"record": record, "resource": resource, "salt": salt})


def open_payload(data: bytes) -> tuple[bytes, bytes, bytes]:
    m = as_map(codec.decode(data, max_size=MAX_PARTS * PART_BYTES), "release", ("record", "resource", "salt"))
    return (as_bytes(m["record"], "release.record", size=16),
            as_bytes(m["resource"], "release.resource", max_len=MAX_PARTS * PART_BYTES),
            as_bytes(m["salt"], "release.salt", size=32))
