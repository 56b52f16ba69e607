"""EMPI assignment: the one function the rest of the node calls to name a patient.

An EMPI is a keyed pseudonym (HMAC-SHA256 under the consortium key): of the
normalized national identifier when the patient has one, so every member that
registers the same person derives the same EMPI; otherwise of this
institution's own patient id, which gives a local EMPI that no other member
can derive. The matching that links patients without a shared identifier
replaces this function, and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from .identifiers import national_identifier

EMPI_PREFIX = "E"


def _pseudonym(key: bytes, text: str) -> str:
    digest = hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()[:15]
    return EMPI_PREFIX + base64.b32encode(digest).decode("ascii")


def assign_empi(patient: dict[str, Any], *, key: bytes, institution: str) -> str:
    """The EMPI of a raw FHIR Patient (24 characters: 'E' and 120 bits in base32)."""
    national = national_identifier(patient)
    if national is not None:
        scheme, value = national
        return _pseudonym(key, f"national\x1f{scheme}\x1f{value}")
    return _pseudonym(key, f"local\x1f{institution}\x1f{patient['id']}")
