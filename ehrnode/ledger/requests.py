"""A signed pull request: what a requester asks an owner for, and what the access log carries.

A request is the canonical CBOR of ``{chain, requester, user, role, owner,
record, purpose, nonce, time, sig}``; ``sig`` is the requester's Ed25519
signature over the rest under its own domain tag, and the request's id is the
SHA-256 of its bytes. ``user`` is the requesting member's pseudonym for the
user who asked (15 bytes) and ``role`` that user's role there: the owner's
policy may decide on the role, and the access log names the user without
naming them. The owner's ``access.log`` carries the request itself, so every
node checks that the requester really asked (an owner cannot log, or later
claim, an access nobody requested) and that each request is decided once.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

from .. import codec, crypto
from ..codec import as_bytes, as_map, as_str, as_uint
from ..errors import CodecError, SchemaError

#: Purposes of use (after the HL7 purpose-of-use codes): what a pull, a consent entry and a
#: policy rule name.
PURPOSES = ("treatment", "payment", "operations", "research", "public-health", "emergency")
PULL_DOMAIN = "ehrnode/pull/v1"
MAX_REQUEST_BYTES = 1024
#: Requests kept decoded: every node decodes a request when the owner's access log arrives and
#: again when its block applies (the owner also when it is asked), so a pull's request is
#: decoded, and its signed bytes encoded, once per node rather than two or three times.
DECODED_KEPT = 8192
NONCE_SIZE = 16
USER_SIZE = 15
#: A user role's name (whole string: use fullmatch), as roles files, policies and requests write it.
ROLE_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,31}")


@dataclass(frozen=True)
class PullRequest:
    chain_id: str
    requester: str
    user: bytes
    role: str
    owner: str
    record: bytes
    purpose: str
    nonce: bytes
    time: int
    signature: bytes

    def _unsigned(self) -> dict[str, Any]:
        unsigned = {"chain": self.chain_id, "requester": self.requester, "owner": self.owner, "record": self.record,
                    "purpose": self.purpose, "nonce": self.nonce, "time": self.time}
        if self.user:  # requests from before users existed name none, and read unchanged
            unsigned.update(user=self.user, role=self.role)
        return unsigned

    @classmethod
    def create(cls, *, chain_id: str, requester: str, user: bytes, role: str, owner: str, record: bytes,
               purpose: str, time_ms: int, identity: crypto.Identity) -> PullRequest:
        if len(user) != USER_SIZE or not ROLE_PATTERN.fullmatch(role):
            raise SchemaError("pull: a request names the user (pseudonym) and their role")
        unsigned = cls(chain_id, requester, user, role, owner, record, purpose, os.urandom(NONCE_SIZE), time_ms,
                       b"")
        signature = identity.sign(unsigned._signed_bytes)
        return cls(chain_id, requester, user, role, owner, record, purpose, unsigned.nonce, time_ms, signature)

    def encode(self) -> bytes:
        return codec.encode({**self._unsigned(), "sig": self.signature})

    @classmethod
    def decode(cls, data: bytes) -> PullRequest:
        """Strictly decode (raises CodecError/SchemaError). A request is immutable, so one
        decoded from the same bytes before is returned again (refusals are not kept)."""
        if len(data) > MAX_REQUEST_BYTES:
            raise CodecError(f"pull request of {len(data)} bytes", reason="too_large")
        return _decode_kept(bytes(data))

    @classmethod
    def _decode(cls, data: bytes) -> PullRequest:
        m = as_map(codec.decode(data, max_size=MAX_REQUEST_BYTES), "pull",
                   ("chain", "requester", "owner", "record", "purpose", "nonce", "time", "sig"),
                   optional=("user", "role"))
        purpose = as_str(m["purpose"], "pull.purpose", max_len=16)
        if purpose not in PURPOSES:
            raise SchemaError(f"pull.purpose: one of {', '.join(PURPOSES)}")
        if ("user" in m) != ("role" in m):
            raise SchemaError("pull: a request names both the user and their role, or neither")
        user = as_bytes(m["user"], "pull.user", size=USER_SIZE) if "user" in m else b""
        role = as_str(m["role"], "pull.role", max_len=32) if "role" in m else ""
        if user and not ROLE_PATTERN.fullmatch(role):
            raise SchemaError("pull.role: a role name")
        return cls(
            as_str(m["chain"], "pull.chain", max_len=64), as_str(m["requester"], "pull.requester", max_len=32),
            user, role,
            as_str(m["owner"], "pull.owner", max_len=32), as_bytes(m["record"], "pull.record", size=16), purpose,
            as_bytes(m["nonce"], "pull.nonce", size=NONCE_SIZE), as_uint(m["time"], "pull.time"),
            as_bytes(m["sig"], "pull.sig", size=crypto.SIGNATURE_SIZE),
        )

    @cached_property
    def _signed_bytes(self) -> bytes:
        return crypto.signing_bytes(PULL_DOMAIN, self._unsigned())

    def signature_ok(self, public_key: bytes) -> bool:
        return crypto.verify(public_key, self._signed_bytes, self.signature)


@lru_cache(maxsize=DECODED_KEPT)
def _decode_kept(data: bytes) -> PullRequest:
    return PullRequest._decode(data)


def request_id(data: bytes) -> bytes:
    return crypto.sha256(data)
