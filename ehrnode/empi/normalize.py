"""Normalization: the quasi-identifiers of a patient, in one comparable form.

Two institutions that register the same person must turn the same facts into
the same strings before anything is encoded, or their encodings cannot agree.
This module reads a FHIR R4 Patient (or a FEBRL CSV row, for the quality tool)
and produces :class:`Demographics`: names casefolded with accents and digits
removed, the birth date as YYYYMMDD, the sex as one letter, address parts,
the phone number as digits, and the national identifier in canonical form.

Nothing here raises on odd demographics. A value that cannot be read (a
partial or impossible birth date, a phone number with too few digits, a
national id that fails its check) is left out and named in ``warnings``; the
patient is then matched on what remains. The warnings are codes, never the
values themselves, so they can be logged.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import FhirError
from .identifiers import national_identifier, rejected_national_identifiers, resident_id_birth_and_sex

#: The scheme under which a FEBRL ``soc_sec_id`` is treated as the national identifier.
FEBRL_ID_SCHEME = "febrl-soc-sec-id"

#: Unicode blocks of CJK ideographs (after NFKD, compatibility ideographs map into these).
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ebef"
                  "\U00030000-\U000323af]")
#: Two-character Chinese family names, for splitting a name given only as text.
_COMPOUND_SURNAMES = frozenset({
    "欧阳", "司马", "诸葛", "上官", "司徒", "东方", "皇甫", "尉迟", "公孙", "慕容", "长孙", "宇文",
    "夏侯", "令狐", "端木", "澹台", "轩辕", "独孤", "南宫", "西门", "呼延", "万俟", "闻人", "申屠",
})
#: Which of several names or addresses is the patient's own, best first.
_NAME_USE_RANK = {"official": 0, "usual": 1, None: 2, "temp": 3, "nickname": 4, "anonymous": 5, "old": 6, "maiden": 7}
_ADDRESS_USE_RANK = {"home": 0, None: 1, "temp": 2, "work": 3, "billing": 4, "old": 5}
_PHONE_USE_RANK = {"mobile": 0, "home": 1, None: 2, "work": 3, "temp": 4, "old": 5}
_SEX = {"male": "m", "female": "f", "other": "o"}

_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")
_PARTIAL_DATE = re.compile(r"^\d{4}(-\d{2})?$")
_STREET_NUMBER = re.compile(r"^(\d+[a-z]?)(?:\s+(.*))?$")
_PHONE_EXTENSION = re.compile(r"(?:x|ext|#|;).*$", re.IGNORECASE)
_CN_MOBILE = re.compile(r"^1[3-9]\d{9}$")


@dataclass(frozen=True)
class Demographics:
    """A patient's normalized quasi-identifiers; an empty string or None means unknown.

    ``given`` is the first given name (for Chinese names, all given characters);
    ``street_number`` is split from the first address line, ``street`` is the rest of
    it, ``address_extra`` the further lines; ``locality`` is the suburb or city.
    """

    given: str = ""
    family: str = ""
    birth_date: str | None = None
    sex: str | None = None
    street_number: str = ""
    street: str = ""
    address_extra: str = ""
    locality: str = ""
    postcode: str = ""
    state: str = ""
    phone: str = ""
    national_id: tuple[str, str] | None = None
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_fhir(cls, patient: Mapping[str, Any]) -> Demographics:
        """Normalize a FHIR R4 Patient (a parsed JSON object).

        Raises FhirError only if ``patient`` is not a Patient resource at all; every
        unreadable field is left out and named in ``warnings``.
        """
        if not isinstance(patient, Mapping) or patient.get("resourceType") != "Patient":
            raise FhirError("EMPI normalization expects a FHIR Patient resource")
        warnings: list[str] = []
        given, family = _fhir_name(patient.get("name"))
        if not given and not family:
            warnings.append("name_missing")
        birth_date, problem = _fhir_birth_date(patient.get("birthDate"))
        if problem:
            warnings.append(problem)
        gender = patient.get("gender")
        sex = _SEX.get(gender) if isinstance(gender, str) else None
        address = _pick(patient.get("address"), _ADDRESS_USE_RANK)
        country = _text(address.get("country")) if address else ""
        phone = ""
        phones = [t for t in patient.get("telecom") or ()
                  if isinstance(t, dict) and t.get("system") in ("phone", "sms")]
        telecom = _pick(phones, _PHONE_USE_RANK)
        if telecom and isinstance(telecom.get("value"), str):
            phone = normalize_phone(telecom["value"], country=country) or ""
            if not phone:
                warnings.append("phone_invalid")
        number, street, extra = _fhir_lines(address.get("line") if address else None)
        national = national_identifier(dict(patient))
        warnings.extend(f"national_id_invalid:{scheme}" for scheme in rejected_national_identifiers(dict(patient)))
        if national is not None and national[0] == "cn-resident-id":
            national, birth_date, sex = _cross_check_resident_id(national, birth_date, sex, warnings)
        return cls(
            given=given, family=family, birth_date=birth_date, sex=sex,
            street_number=number, street=street, address_extra=extra,
            locality=normalize_text(_text(address.get("city")) or _text(address.get("district"))) if address else "",
            postcode=normalize_postcode(_text(address.get("postalCode"))) if address else "",
            state=normalize_text(_text(address.get("state"))) if address else "",
            phone=phone, national_id=national, warnings=tuple(warnings),
        )

    @classmethod
    def from_febrl(cls, row: Mapping[str, str], *, national_id: bool = True) -> Demographics:
        """Normalize one FEBRL CSV row (keys as in its header; values may carry spaces).

        ``national_id=False`` ignores ``soc_sec_id``, as an institution without one would.
        """
        def get(name: str) -> str:
            value = row.get(name)
            return value.strip() if isinstance(value, str) else ""

        warnings: list[str] = []
        given, family = normalize_name(get("given_name")), normalize_name(get("surname"))
        if not given and not family:
            warnings.append("name_missing")
        birth_date = None
        if get("date_of_birth"):
            birth_date = normalize_date(get("date_of_birth"))
            if birth_date is None:
                warnings.append("birth_date_invalid")
        ssid = re.sub(r"\D", "", get("soc_sec_id"))
        return cls(
            given=given, family=family, birth_date=birth_date,
            street_number=normalize_text(get("street_number")).replace(" ", ""),
            street=normalize_text(get("address_1")), address_extra=normalize_text(get("address_2")),
            locality=normalize_text(get("suburb")), postcode=normalize_postcode(get("postcode")),
            state=normalize_text(get("state")),
            national_id=(FEBRL_ID_SCHEME, ssid) if national_id and ssid else None,
            warnings=tuple(warnings),
        )


def is_cjk(char: str) -> bool:
    """True for a CJK ideograph (the characters of Chinese, and Japanese kanji)."""
    return _CJK.match(char) is not None


def has_cjk(text: str) -> bool:
    """True if the text holds a CJK ideograph."""
    return _CJK.search(text) is not None


#: ASCII fast path of _fold: apostrophes join, anything but letters (and digits) separates.
_ASCII_APOSTROPHE = str.maketrans("", "", "'`")
_ASCII_LETTERS = re.compile(r"[^a-z]+")
_ASCII_LETTERS_DIGITS = re.compile(r"[^a-z0-9]+")
_ASCII_DIGITS = re.compile(r"[0-9]+")


def _fold(text: str, *, digits: bool) -> str:
    if text.isascii():
        text = text.lower().translate(_ASCII_APOSTROPHE)
        if not digits:
            text = _ASCII_DIGITS.sub("", text)
        return " ".join((_ASCII_LETTERS_DIGITS if digits else _ASCII_LETTERS).sub(" ", text).split())
    # casefold first: it can itself produce combining marks, which NFKD then separates.
    out = []
    for ch in unicodedata.normalize("NFKD", text.casefold()):
        if unicodedata.category(ch) == "Mn" or ch in "'’`":
            continue  # accents go; an apostrophe joins (o'keefe -> okeefe)
        if ch.isalpha() or (digits and "0" <= ch <= "9"):
            out.append(ch)
        elif not ch.isdigit():
            out.append(" ")
    return " ".join(unicodedata.normalize("NFC", "".join(out)).split())


def normalize_name(text: str) -> str:
    """Letters only, casefolded, accents removed, words separated by one space.

    Digits are dropped, not kept: names do not carry digits, and the ones that do
    (Synthea's "Sumiko254") carry them as generator noise that would otherwise stop
    "Sumiko254" linking to "Sumiko". CJK characters are letters and are kept as is.
    """
    return _fold(text, digits=False)


def normalize_text(text: str) -> str:
    """Address text: letters and ASCII digits, casefolded, accents removed, single spaces."""
    return _fold(text, digits=True)


def normalize_postcode(text: str) -> str:
    """A postal code without spaces or punctuation, casefolded ("SW1A 1AA" -> "sw1a1aa")."""
    return normalize_text(text).replace(" ", "")


def normalize_date(text: str) -> str | None:
    """A full calendar date as YYYYMMDD, or None if partial, malformed or impossible.

    Years before 1800 are treated as impossible for a living register.
    """
    m = _DATE.match(text.strip())
    if m is None:
        return None
    year, month, day = (int(g) for g in m.groups())
    if year < 1800 or not 1 <= month <= 12 or not 1 <= day <= _days_in_month(year, month):
        return None
    return "".join(m.groups())


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def normalize_phone(text: str, *, country: str = "") -> str | None:
    """The phone number as national digits, or None if it has fewer than 6 or more than 15.

    An international prefix (+ or 00) of mainland China (86) or the North American
    plan (1) is removed, and so is a Chinese trunk 0, so that the forms one person's
    number is written in agree: "+86 138 0013 8000" and "13800138000" give the same
    11 digits; "+1 (555) 810-7203" and "555-810-7203" the same 10. Without a prefix, an
    11-digit number starting with 1 is a mainland mobile unless the address is in the
    US, where it is a 1 and a 10-digit number. Other countries keep their code.
    """
    text = _PHONE_EXTENSION.sub("", unicodedata.normalize("NFKC", text)).strip()
    digits = "".join(ch for ch in text if "0" <= ch <= "9")
    international = text.startswith("+") or digits.startswith("00")
    if digits.startswith("00"):
        digits = digits[2:]
    country = country.strip().casefold()
    chinese = country in ("cn", "chn", "china", "中国")
    if international:
        if digits.startswith("86"):
            digits, chinese = digits[2:], True
        elif digits.startswith("1") and len(digits) == 11:
            digits = digits[1:]
    elif country in ("us", "usa", "united states") and len(digits) == 11 and digits.startswith("1"):
        digits = digits[1:]
    if chinese and digits.startswith("0") and not _CN_MOBILE.match(digits):
        digits = digits[1:]
    return digits if 6 <= len(digits) <= 15 else None


def split_name_text(text: str) -> tuple[str, str]:
    """(given, family) from a name written as one string.

    Chinese: the family name comes first, one character or a known two-character
    surname (欧阳, 司马, ...). Latin: "Family, Given" when there is a comma, else the
    last word is the family name and the first the given name.
    """
    if "," in text:
        family, _, given = text.partition(",")
        return _first_word(normalize_name(given)), normalize_name(family)
    name = normalize_name(text)
    compact = name.replace(" ", "")
    if compact and is_cjk(compact[0]):
        cut = 2 if compact[:2] in _COMPOUND_SURNAMES and len(compact) > 2 else 1
        return compact[cut:], compact[:cut]
    words = name.split()
    if not words:
        return "", ""
    return (words[0], words[-1]) if len(words) > 1 else ("", words[0])


def _first_word(name: str) -> str:
    return name.split(" ", 1)[0] if name else ""


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _pick(items: Any, rank: Mapping[str | None, int]) -> dict[str, Any] | None:
    """The best-ranked dict of a FHIR list by its ``use`` (first wins a tie)."""
    best, best_rank = None, None
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict):
            continue
        r = rank.get(item.get("use"), len(rank))
        if best_rank is None or r < best_rank:
            best, best_rank = item, r
    return best


def _fhir_name(names: Any) -> tuple[str, str]:
    name = _pick(names, _NAME_USE_RANK)
    if name is None:
        return "", ""
    family = normalize_name(_text(name.get("family")))
    givens = [normalize_name(g) for g in name.get("given") or () if isinstance(g, str)]
    givens = [g for g in givens if g]
    if givens and has_cjk(givens[0]):
        given = "".join(givens).replace(" ", "")  # one Chinese given name, however it was split
    else:
        given = _first_word(givens[0]) if givens else ""
    if not given and not family and _text(name.get("text")):
        return split_name_text(name["text"])
    return given, family


def _fhir_birth_date(value: Any) -> tuple[str | None, str | None]:
    if not isinstance(value, str) or not value.strip():
        return None, None
    if _PARTIAL_DATE.match(value.strip()):
        return None, "birth_date_partial"
    date = normalize_date(value)
    return date, (None if date else "birth_date_invalid")


def _fhir_lines(lines: Any) -> tuple[str, str, str]:
    texts = [normalize_text(line) for line in lines or () if isinstance(line, str)]
    texts = [t for t in texts if t]
    if not texts:
        return "", "", ""
    m = _STREET_NUMBER.match(texts[0])
    number, street = (m.group(1), m.group(2) or "") if m else ("", texts[0])
    return number, street, " ".join(texts[1:])


def _cross_check_resident_id(
    national: tuple[str, str], birth_date: str | None, sex: str | None, warnings: list[str],
) -> tuple[tuple[str, str] | None, str | None, str | None]:
    """Trust a resident id only if the birth date and sex it encodes agree with the record's.

    A missing birth date or sex is taken from the id. On a mismatch the id is not used
    as the national identifier (it may be someone else's, or mistyped into a valid one)
    and the record's own values stand.
    """
    derived = resident_id_birth_and_sex(national[1])
    if derived is None:
        warnings.append("resident_id_birth_date_invalid")
        return None, birth_date, sex
    id_birth, id_sex = derived
    trusted = True
    if birth_date is not None and birth_date != id_birth:
        warnings.append("resident_id_birth_date_mismatch")
        trusted = False
    if sex in ("m", "f") and sex != id_sex:
        warnings.append("resident_id_sex_mismatch")
        trusted = False
    if not trusted:
        return None, birth_date, sex
    return national, birth_date or id_birth, sex or id_sex
