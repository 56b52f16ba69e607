"""National identifiers: recognizing them on a FHIR Patient and normalizing them.

Two institutions that hold the same person's national identifier must derive
the same EMPI from it, so the identifier is normalized first: a US Social
Security number to its nine digits, a mainland Chinese resident identity
card number (GB 11643-1999) to its 18 characters with an upper-case check
character, after the check character is verified. A number that fails its own
checks is not trusted as national: the patient falls back to a local EMPI
rather than risk joining two people on a typo.
"""

from __future__ import annotations

import re
from typing import Any

SSN_SYSTEM = "http://hl7.org/fhir/sid/us-ssn"
#: Systems seen for Chinese resident identity card numbers (the national OID and common URIs).
CN_ID_SYSTEMS = frozenset({
    "urn:oid:1.2.156.112604.1.2.1", "urn:oid:2.16.156.10011.1.1", "http://www.nhc.gov.cn/id-card",
})
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_CN_ID = re.compile(r"^\d{17}[\dX]$")
_SSN = re.compile(r"^(\d{3})-?(\d{2})-?(\d{4})$")


def resident_id_check_char(first17: str) -> str:
    """The GB 11643-1999 (ISO 7064 MOD 11-2) check character for 17 digits."""
    return _ID_CHECK[sum(int(d) * w for d, w in zip(first17, _ID_WEIGHTS, strict=True)) % 11]


def normalize_resident_id(value: str) -> str | None:
    """The 18-character resident id in canonical form, or None if it is not a valid one."""
    text = re.sub(r"[\s-]", "", value).upper()
    if not _CN_ID.match(text) or resident_id_check_char(text[:17]) != text[17]:
        return None
    return text


def normalize_ssn(value: str) -> str | None:
    m = _SSN.match(value.strip())
    if m is None:
        return None
    area, group, serial = m.groups()
    # Never-issued forms (000, 666, 9xx areas; 00 group; 0000 serial) are not identifiers.
    # Synthea's test numbers use the 999 area, which is accepted so test data links.
    if area in ("000", "666") or group == "00" or serial == "0000":
        return None
    return area + group + serial


def _type_codes(identifier: dict[str, Any]) -> set[str]:
    kind = identifier.get("type")
    codings = kind.get("coding", []) if isinstance(kind, dict) else []
    return {c["code"] for c in codings if isinstance(c, dict) and isinstance(c.get("code"), str)}


def national_identifier(patient: dict[str, Any]) -> tuple[str, str] | None:
    """(scheme, normalized value) of the patient's national identifier, or None."""
    for identifier in patient.get("identifier") or ():
        if not isinstance(identifier, dict) or not isinstance(identifier.get("value"), str):
            continue
        system, value, codes = identifier.get("system"), identifier["value"], _type_codes(identifier)
        if system in CN_ID_SYSTEMS or "NNCHN" in codes or ("NI" in codes and len(value.strip()) == 18):
            normalized = normalize_resident_id(value)
            if normalized:
                return "cn-resident-id", normalized
        elif system == SSN_SYSTEM or "SS" in codes:
            normalized = normalize_ssn(value)
            if normalized:
                return "us-ssn", normalized
    return None


def resident_id_birth_and_sex(normalized: str) -> tuple[str, str] | None:
    """(birth date YYYYMMDD, sex "m" or "f") encoded in a normalized resident id, or None.

    A number can pass its check character and still carry an impossible birth date
    (digits 7-14); None then, and the number is not trusted as national. The sex is
    the parity of the 17th digit (odd: male).
    """
    if not _CN_ID.match(normalized):
        return None
    birth = normalized[6:14]
    year, month, day = int(birth[:4]), int(birth[4:6]), int(birth[6:])
    if year < 1800 or not 1 <= month <= 12 or not 1 <= day <= _days_in_month(year, month):
        return None
    return birth, ("m" if int(normalized[16]) % 2 else "f")


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def rejected_national_identifiers(patient: dict[str, Any]) -> list[str]:
    """Schemes of identifiers that claim to be national but fail their own checks.

    These are the numbers :func:`national_identifier` silently passes over; callers
    report them so a typo in an id is visible rather than quietly ignored.
    """
    rejected = []
    for identifier in patient.get("identifier") or ():
        if not isinstance(identifier, dict) or not isinstance(identifier.get("value"), str):
            continue
        system, value, codes = identifier.get("system"), identifier["value"], _type_codes(identifier)
        if system in CN_ID_SYSTEMS or "NNCHN" in codes or ("NI" in codes and len(value.strip()) == 18):
            if normalize_resident_id(value) is None:
                rejected.append("cn-resident-id")
        elif system == SSN_SYSTEM or "SS" in codes:
            if normalize_ssn(value) is None:
                rejected.append("us-ssn")
    return rejected
