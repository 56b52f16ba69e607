"""The one byte form of a FHIR resource that commitments are computed over.

A record's commitment on chain is ``SHA-256(salt || canonical JSON of the
de-identified resource)``: keys sorted, no insignificant whitespace, UTF-8,
no NaN or infinities. The served release travels as exactly these bytes, so
the requester recomputes the commitment over what it received without
re-serializing anything. The 32-byte random salt keeps a commitment from
being tested against guessed content (a common diagnosis for a known
patient, say) by anyone who reads the chain.
"""

from __future__ import annotations

import hmac
import json
import os
from typing import Any

from .. import crypto

SALT_SIZE = 32


def canonical_json(resource: Any) -> bytes:
    return json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def new_salt() -> bytes:
    return os.urandom(SALT_SIZE)


def commitment(salt: bytes, canonical: bytes) -> bytes:
    return crypto.sha256(salt + canonical)


def matches(salt: bytes, canonical: bytes, expected: bytes) -> bool:
    return hmac.compare_digest(commitment(salt, canonical), expected)
