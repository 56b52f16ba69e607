"""Free text: the identifying patterns scrubbed out of text a profile releases, and the check
of a PRC resident identity card number."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date

from ...empi.identifiers import resident_id_check_char

_MONTH = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
_NOT_ALNUM_BEFORE = r"(?<![0-9A-Za-z])"
_NOT_ALNUM_AFTER = r"(?![0-9A-Za-z])"
#: In order: at one position the first pattern that matches wins. ASCII look-arounds,
#: not \b, because \b sees no boundary between a CJK character and a digit.
_SCRUB_PATTERNS = {
    "url": r"(?:https?|ftp)://[^\s<>\"']+|www\.[^\s<>\"']+",
    "email": r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",
    "ip": _NOT_ALNUM_BEFORE + r"(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)"
          + _NOT_ALNUM_AFTER + r"|(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![0-9A-Fa-f:])"
          r"|(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,5})?"
          r"(?![0-9A-Fa-f:])",
    "date": _NOT_ALNUM_BEFORE + r"(?:\d{4}-\d{1,2}-\d{1,2}(?:[T ]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?"
            r"(?:Z|[+-]\d{2}:?\d{2})?)?|\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}|\d{4}/\d{1,2}/\d{1,2}"
            r"|" + _MONTH + r"\s+\d{1,2}(?:st|nd|rd|th)?,?\s+\d{4}|\d{1,2}\s+" + _MONTH + r",?\s+\d{4}"
            r"|" + _MONTH + r"\s+\d{4})" + _NOT_ALNUM_AFTER
            + r"|\d{4}\s*年\s*\d{1,2}\s*月(?:\s*\d{1,2}\s*[日号])?",
    "cn-resident-id": _NOT_ALNUM_BEFORE + r"\d{17}[\dXx]" + _NOT_ALNUM_AFTER,
    "ssn": r"(?<!\d)\d{3}[- ]\d{2}[- ]\d{4}(?!\d)",
    "cn-mobile": r"(?<!\d)(?:\+?86[- ]?)?1[3-9]\d(?:[- ]?\d{4}){2}(?!\d)",
    "phone": r"(?<![\d+])(?:\+?1[-. ]?)?(?:\(\d{3}\)\s?|\d{3}[-. ]?)\d{3}[-. ]?\d{4}(?!\d)",
    "record-number": r"(?:MRN|MR#|[Mm]edical [Rr]ecord(?: [Nn]umber| [Nn]o\.?)?|[Aa]ccount(?: [Nn]umber| [Nn]o\.?)?"
                     r"|[Pp]atient [Ii][Dd]|病历号|住院号|门诊号|病案号|身份证号?|医保卡?号)\s*[:#：]?\s*"
                     r"[A-Za-z0-9-]*\d[A-Za-z0-9-]*",
    "age-90": r"(?<!\d)(?:9\d|1[0-4]\d)(?:[- ]?(?:years?|yrs?)(?:[- ]old)?|[- ]?y/?o" + _NOT_ALNUM_AFTER + r"|\s*岁)",
    "long-number": _NOT_ALNUM_BEFORE + r"(?=[A-Za-z0-9-]*\d{6})[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                   + _NOT_ALNUM_AFTER,
}
_SCRUB = re.compile("|".join(f"(?:{p})" for p in _SCRUB_PATTERNS.values()), re.IGNORECASE)
#: What every pattern above needs somewhere in the text: a digit (every number, date, identifier
#: and labelled record number), "@" (e-mail), ":" (a URL's scheme, an IPv6 address) or "www."
#: (under the same flags, so it matches exactly the characters they match). Text without any is
#: left as it is at once: most coded text (display names, units) holds none, and the patterns
#: together cost some 20 microseconds a search where this costs one.
_CANDIDATE = re.compile(r"[\d@:]|www\.", re.IGNORECASE)
# Shared with the notes scrubber.
NOT_ALNUM_BEFORE, NOT_ALNUM_AFTER = _NOT_ALNUM_BEFORE, _NOT_ALNUM_AFTER
IP_PATTERN = _SCRUB_PATTERNS["ip"]  # IPv4 and IPv6 addresses
EMAIL_PATTERN = _SCRUB_PATTERNS["email"]
SSN_PATTERN = _SCRUB_PATTERNS["ssn"]
LONG_NUMBER_PATTERN = _SCRUB_PATTERNS["long-number"]  # a token holding six digits in a row
_TAG = re.compile(r"(<[^>]*>)")
REDACTED = "[REDACTED]"


def scrub_text(text: str) -> str:
    """``text`` with identifying patterns replaced by "[REDACTED]".

    Patterns: URLs, e-mail and IP addresses, dates (ISO, numeric, with month names,
    Chinese 年月日), 18-character resident identity card numbers, SSNs, mainland mobile
    and North American phone numbers, labelled record/account numbers (English and
    Chinese labels), ages of 90 and over, and any token holding six or more digits in a
    row. Names are not patterns: free text holding names must be redacted, not scrubbed.
    """
    return _SCRUB.sub(REDACTED, text) if _CANDIDATE.search(text) else text


def has_pattern(text: str) -> bool:
    """Whether :func:`scrub_text` would change ``text``."""
    return _CANDIDATE.search(text) is not None and _SCRUB.search(text) is not None


def scrub_markup(text: str, scrub: Callable[[str], str]) -> str:
    """Scrub the text between tags only, so the markup and namespaces stay intact."""
    return "".join(part if part.startswith("<") else scrub(part) for part in _TAG.split(text))


def valid_resident_id(value: str) -> bool:
    """True for an 18-character PRC resident identity card number (GB 11643-1999).

    17 digits, of which the 7th to 14th are a real birth date, then the ISO 7064
    MOD 11-2 check character (a digit or X; a lower-case x is accepted).
    """
    if not isinstance(value, str) or not re.fullmatch(r"\d{17}[\dXx]", value):
        return False
    try:
        date(int(value[6:10]), int(value[10:12]), int(value[12:14]))
    except ValueError:
        return False
    return resident_id_check_char(value[:17]) == value[17].upper()


