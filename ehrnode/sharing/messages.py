"""The pull messages: a signed request (:mod:`ehrnode.ledger.requests`: the access log carries
it), and the owner's answer in one or more parts.

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

from dataclasses import dataclass

from .. import codec
from ..codec import as_bytes, as_map, as_str, as_uint
from ..errors import SchemaError
from ..ledger.requests import PullRequest, request_id

__all__ = ["PullAnswer", "PullRequest", "open_payload", "release_payload", "request_id", "split_served"]

#: Sealed release bytes per answer part (an answer frame stays well inside the 8 MiB frame).
PART_BYTES = 4 * 1024 * 1024
#: Enough parts for the largest release intake accepts (64 MiB), sealed.
MAX_PARTS = 20
STATUSES = ("served", "refused", "rejected", "unavailable")


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
