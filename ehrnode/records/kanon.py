"""k-anonymity over the quasi-identifiers a released Patient still carries.

Theory of operation
-------------------
After de-identification a Patient keeps three attributes that, combined, can still
single a person out: when they were born, their gender, and where they live. Each
patient is released at a *level*; one level coarsens all three together:

=====  ============================  =======  =====================================
level  birth                         gender   region
=====  ============================  =======  =====================================
0      year ("1960")                 kept     country / state / ZIP3 (US only)
1      5-year band ("1960-1964")     kept     country / state
2      10-year band ("1960-1969")    kept     country
3      removed                       kept     removed
4      removed (``SUPPRESSED``)      removed  removed
=====  ============================  =======  =====================================

Two more attributes travel with those: the death, with birth (the year of death at level 0,
only that the patient died at levels 1 and 2, nothing from level 3), and birth sex and
gender identity (the US Core extensions), with gender. They are part of the value a class
is formed on, so two patients alike in everything but birth sex are not one class, and
a patient at level 4 releases none of them.

A person aged 90 or over on the day of release is "90+" at levels 0 to 2 (Safe Harbor
forbids any year that reveals such an age), so a band never straddles that age for them.
Level 0 is what the profile's own rules release (the default profile's Safe Harbor form).

:func:`choose_levels` is greedy, one level at a time: at level L the patients still
without a level are grouped by the value they would release at L; every group that,
together with the patients already released with that same value, has at least k
members is fixed at L; the others try L + 1. Patients left after level 3 are
suppressed. Values written at different levels never coincide (a year is not a band,
a band not "90+"), except that a value with nothing in it matches at every level; such
coincidences only make a class larger. So, over the patients the levels were chosen
for: every released (birth, gender, region) value that is not entirely empty is shared
by at least k of them, and a suppressed patient releases none of the three.

What this does not protect: attributes outside the three (race, ethnicity, year of
death, diagnoses, the shifted dates of encounters) may still make a record unique;
an attacker who knows the algorithm may learn something from which level a patient
got; and the guarantee holds for one set of levels chosen together. Patients released
earlier are passed as ``released`` so a later choice counts them without changing them.

Representation in FHIR (all valid R4): a year is ``birthDate`` "YYYY"; a band drops
``birthDate`` and adds an extension :data:`BIRTH_PERIOD_URL` with ``valuePeriod``
(start and end years, inclusive, as FHIR reads a year-precision period); "90+" drops
``birthDate`` and adds :data:`AGE_GROUP_URL` with ``valueString`` "90+"; the region is
one Address holding only ``country``, ``state`` and (level 0) ``postalCode`` as ZIP3.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any

AGE_GROUP_URL = "https://ehrnode.org/fhir/StructureDefinition/age-group"
BIRTH_PERIOD_URL = "https://ehrnode.org/fhir/StructureDefinition/birth-period"
BIRTH_SEX_URL = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex"
GENDER_IDENTITY_URL = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-genderIdentity"
#: The extensions k-anonymity writes: whatever a Patient carries under these URLs is its to decide.
QUASI_EXTENSIONS = frozenset({AGE_GROUP_URL, BIRTH_PERIOD_URL, BIRTH_SEX_URL, GENDER_IDENTITY_URL})
_BIRTH_SEXES = frozenset({"F", "M", "UNK"})
_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Highest level that still releases something (gender).
TOP_LEVEL = 3
#: The level of a patient whose quasi-identifiers are all removed.
SUPPRESSED = 4
#: Safe Harbor: ages over 89 are aggregated into one category.
OLDEST_AGE = 90
#: Three-digit ZIP areas of 20,000 people or fewer (2000 census), released as "000".
RESTRICTED_ZIP3 = frozenset({
    "036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831", "878", "879", "884",
    "890", "893",
})
_US = frozenset({"US", "USA", "UNITED STATES", "UNITED STATES OF AMERICA"})
#: Patient.gender's required binding (AdministrativeGender): anything else is not released.
GENDERS = frozenset({"male", "female", "other", "unknown"})
_ZIP = re.compile(r"\s*(\d{3})\d{2}(?:-?\d{4})?\s*")
_FHIR_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")
_BANDS = {1: 5, 2: 10}

#: (birth, gender, region) as released; ``None`` where nothing is released.
Released = tuple[str | None, str | None, str | None]


@dataclass(frozen=True)
class QuasiIdentifiers:
    """One raw Patient's quasi-identifiers, before any generalization."""

    birth_date: str | None
    gender: str | None
    country: str | None
    state: str | None
    postal_code: str | None
    birth_sex: str | None = None
    #: (system, code) of the gender identity's first coding.
    gender_identity: tuple[str, str] | None = None
    #: The year of death, or "yes" for a patient known to have died without a date.
    deceased: str | None = None

    @property
    def birth_year(self) -> int | None:
        m = _FHIR_DATE.match(self.birth_date or "")
        return int(m.group(1)) if m else None


def quasi_identifiers(patient: Mapping[str, Any]) -> QuasiIdentifiers:
    """The quasi-identifiers of a raw (not de-identified) Patient resource."""
    address = current_address(patient) or {}
    gender = _text(patient.get("gender"))
    birth_sex = identity = None
    for ext in patient.get("extension") or ():
        if not isinstance(ext, Mapping):
            continue
        if ext.get("url") == BIRTH_SEX_URL and _text(ext.get("valueCode")) in _BIRTH_SEXES:
            birth_sex = ext["valueCode"]
        elif ext.get("url") == GENDER_IDENTITY_URL and isinstance(ext.get("valueCodeableConcept"), Mapping):
            for coding in ext["valueCodeableConcept"].get("coding") or ():
                if isinstance(coding, Mapping) and isinstance(coding.get("system"), str) and isinstance(
                        coding.get("code"), str) and _CODE.fullmatch(coding["code"]):
                    identity = (coding["system"], coding["code"])
                    break
    deceased = None
    died = _FHIR_DATE.match(_text(patient.get("deceasedDateTime")) or "")
    if died:
        deceased = died.group(1)
    elif patient.get("deceasedBoolean") is True:
        deceased = "yes"
    return QuasiIdentifiers(
        _text(patient.get("birthDate")), gender if gender in GENDERS else None, place(address.get("country")),
        place(address.get("state")), _text(address.get("postalCode")), birth_sex, identity, deceased,
    )


_PLACE = re.compile(r"[A-Za-z][A-Za-z .'-]{1,39}|[\u4e00-\u9fff]{2,12}")


def place(value: Any) -> str | None:
    """A country or state as released: a name or code of letters only (an address field can
    hold any text, and these two are released as they are)."""
    text = _text(value)
    return text if text is not None and _PLACE.fullmatch(text) else None


def current_address(patient: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The address a Patient's region is taken from: the first one not marked old or ended."""
    addresses = [a for a in patient.get("address") or () if isinstance(a, Mapping)]
    for address in addresses:
        period = address.get("period")
        ended = isinstance(period, Mapping) and period.get("end")
        if address.get("use") != "old" and not ended:
            return address
    return addresses[0] if addresses else None


def zip3(postal_code: str | None, country: str | None) -> str | None:
    """A US ZIP code's first three digits ("000" for the restricted areas), else None.

    The three-digit rule is Safe Harbor's and only defined for US ZIP codes; other
    countries' postal codes are not released.
    """
    if postal_code is None or (country is not None and country.strip().upper() not in _US):
        return None
    m = _ZIP.fullmatch(postal_code)
    if m is None:
        return None
    return "000" if m.group(1) in RESTRICTED_ZIP3 else m.group(1)


def age_on(birth_date: str, today: date) -> int | None:
    """Age in whole years on ``today``; for a year or month, the oldest the person can be."""
    m = _FHIR_DATE.match(birth_date)
    if m is None:
        return None
    year, month, day = int(m.group(1)), int(m.group(2) or 1), int(m.group(3) or 1)
    return today.year - year - ((today.month, today.day) < (month, day))


@dataclass(frozen=True)
class Hierarchy:
    """How a profile releases the three quasi-identifiers at each level.

    ``birth``, ``gender`` and ``region`` say whether the profile releases them at all;
    ``zip3`` whether level 0 carries the three-digit ZIP. A profile that releases less
    than the default only merges classes, so levels chosen with the default hierarchy
    stay valid for it.
    """

    today: date = field(default_factory=date.today)
    birth: bool = True
    gender: bool = True
    region: bool = True
    zip3: bool = True
    #: Whether the profile releases birth sex, gender identity and the death at all.
    birth_sex: bool = True
    gender_identity: bool = True
    deceased: bool = True

    def parts(self, qi: QuasiIdentifiers, level: int) -> tuple[str | None, str | None, tuple[str | None, ...]]:
        """(birth, gender, (country, state, zip3)) released at ``level``."""
        if not 0 <= level <= SUPPRESSED:
            raise ValueError(f"level {level} is not in 0..{SUPPRESSED}")
        birth = self._birth(qi, level) if self.birth else None
        gender = qi.gender if self.gender and level < SUPPRESSED else None
        region: tuple[str | None, ...] = ()
        if self.region and level < TOP_LEVEL:
            region = (qi.country, qi.state, zip3(qi.postal_code, qi.country) if self.zip3 else None)[:3 - level]
        return birth, gender, region

    def extras(self, qi: QuasiIdentifiers, level: int) -> tuple[str | None, str | None, tuple[str, str] | None]:
        """(death, birth sex, gender identity) released at ``level``: the death with birth, the
        other two with gender."""
        death = None
        if self.deceased and qi.deceased is not None and level < TOP_LEVEL:
            death = qi.deceased if level == 0 else "yes"
        with_gender = level < SUPPRESSED
        return (death, qi.birth_sex if self.birth_sex and with_gender else None,
                qi.gender_identity if self.gender_identity and with_gender else None)

    def release(self, qi: QuasiIdentifiers, level: int) -> Released:
        """The (birth, gender, region) value a patient releases at ``level``."""
        birth, gender, region = self.parts(qi, level)
        death, sex, identity = self.extras(qi, level)
        return _with_death(birth, death), _with_sex(gender, sex, identity), region_text(region)

    def elements(self, qi: QuasiIdentifiers, level: int) -> dict[str, Any]:
        """The Patient elements that carry the release: birthDate, gender, address, deceased[x],
        extension."""
        birth, gender, region = self.parts(qi, level)
        death, sex, identity = self.extras(qi, level)
        out: dict[str, Any] = {}
        extensions: list[dict[str, Any]] = []
        if birth is not None and "-" in birth:
            start, end = birth.split("-")
            extensions.append({"url": BIRTH_PERIOD_URL, "valuePeriod": {"start": start, "end": end}})
        elif birth == "90+":
            extensions.append({"url": AGE_GROUP_URL, "valueString": "90+"})
        elif birth is not None:
            out["birthDate"] = birth
        if gender is not None:
            out["gender"] = gender
        if sex is not None:
            extensions.append({"url": BIRTH_SEX_URL, "valueCode": sex})
        if identity is not None:
            extensions.append({"url": GENDER_IDENTITY_URL,
                               "valueCodeableConcept": {"coding": [{"system": identity[0], "code": identity[1]}]}})
        if death == "yes":
            out["deceasedBoolean"] = True
        elif death is not None:
            out["deceasedDateTime"] = death
        address = {k: v for k, v in zip(("country", "state", "postalCode"), region, strict=False) if v is not None}
        if address:
            out["address"] = [address]
        if extensions:
            out["extension"] = extensions
        return out

    def _birth(self, qi: QuasiIdentifiers, level: int) -> str | None:
        year = qi.birth_year
        if year is None or level >= TOP_LEVEL:
            return None
        age = age_on(qi.birth_date or "", self.today)
        if age is not None and age >= OLDEST_AGE:
            return "90+"
        if level == 0:
            return f"{year:04d}"
        width = _BANDS[level]
        start = year - year % width
        return f"{start:04d}-{start + width - 1:04d}"


def region_text(parts: Iterable[str | None]) -> str | None:
    """"country/state/zip3" with the released parts (an unknown inner part stays empty)."""
    text = "/".join(p or "" for p in parts).rstrip("/")
    return text or None


def released_quasi(patient: Mapping[str, Any]) -> Released:
    """The (birth, gender, region) value a de-identified Patient actually carries (with its
    death, birth sex and gender identity, as :meth:`Hierarchy.release` writes them)."""
    birth = _text(patient.get("birthDate"))
    sex = identity = None
    for ext in patient.get("extension") or ():
        if not isinstance(ext, Mapping):
            continue
        if ext.get("url") == AGE_GROUP_URL:
            birth = _text(ext.get("valueString"))
        elif ext.get("url") == BIRTH_PERIOD_URL and isinstance(ext.get("valuePeriod"), Mapping):
            birth = f"{ext['valuePeriod'].get('start')}-{ext['valuePeriod'].get('end')}"
        elif ext.get("url") == BIRTH_SEX_URL:
            sex = _text(ext.get("valueCode"))
        elif ext.get("url") == GENDER_IDENTITY_URL and isinstance(ext.get("valueCodeableConcept"), Mapping):
            codings = [c for c in ext["valueCodeableConcept"].get("coding") or () if isinstance(c, Mapping)]
            if codings:
                identity = (str(codings[0].get("system")), str(codings[0].get("code")))
    death = "yes" if patient.get("deceasedBoolean") is True else _text(patient.get("deceasedDateTime"))
    addresses = [a for a in patient.get("address") or () if isinstance(a, Mapping)]
    region = None
    if addresses:
        a = addresses[0]
        region = region_text((_text(a.get("country")), _text(a.get("state")), _text(a.get("postalCode"))))
    return _with_death(birth, death), _with_sex(_text(patient.get("gender")), sex, identity), region


def _with_death(birth: str | None, death: str | None) -> str | None:
    return birth if death is None else f"{birth or ''};died {death}"


def _with_sex(gender: str | None, sex: str | None, identity: tuple[str, str] | None) -> str | None:
    parts = [gender or ""]
    if sex is not None:
        parts.append(f"birth-sex {sex}")
    if identity is not None:
        parts.append(f"identity {identity[0]}|{identity[1]}")
    return gender if len(parts) == 1 else ";".join(parts)


def choose_levels(
    population: Mapping[str, QuasiIdentifiers], k: int, *,
    hierarchy: Hierarchy | None = None,
    released: Mapping[str, Iterable[str | None]] | None = None,
) -> dict[str, int]:
    """Per patient id, the lowest level at which its released value is shared by >= k patients.

    ``released`` holds the values of patients already released, which count towards
    classes but are not given levels (an id in both is treated as released). Patients
    that cannot reach k even at :data:`TOP_LEVEL` get :data:`SUPPRESSED`. With k <= 1
    every patient gets level 0. ``hierarchy`` defaults to the fullest release (year,
    ZIP3) on today's date.
    """
    done = {pid: tuple(value) for pid, value in (released or {}).items()}
    pending = [pid for pid in population if pid not in done]
    if k <= 1:
        return {pid: 0 for pid in pending}
    hierarchy = hierarchy or Hierarchy()
    counted = Counter(done.values())
    return _greedy(pending, k, counted, lambda pid, level: hierarchy.release(population[pid], level))


def _greedy(pending: list[str], k: int, counted: Counter[tuple[Any, ...]],
            release: Callable[[str, int], Released]) -> dict[str, int]:
    levels: dict[str, int] = {}
    for level in range(TOP_LEVEL + 1):
        groups: dict[Released, list[str]] = defaultdict(list)
        for pid in pending:
            groups[release(pid, level)].append(pid)
        pending = []
        for value, members in groups.items():
            if len(members) + counted[value] >= k:
                levels.update((pid, level) for pid in members)
            else:
                pending.extend(members)
    levels.update((pid, SUPPRESSED) for pid in pending)
    return levels


def kanon_report(released: Iterable[Iterable[Any]], k: int) -> dict[str, Any]:
    """How far a set of released values is k-anonymous.

    ``k_reached`` is the smallest class among patients that release anything (0 if
    none do); ``suppressed`` counts patients that release nothing, who match every
    patient and are not a class; ``below_k`` counts patients in classes smaller than k.
    """
    values = [tuple(v) for v in released]
    suppressed = sum(1 for v in values if all(x is None for x in v))
    classes = Counter(v for v in values if any(x is not None for x in v))
    sizes = sorted(classes.values())
    return {
        "k_target": k,
        "k_reached": sizes[0] if sizes else 0,
        "classes": len(classes),
        "patients": len(values),
        "suppressed": suppressed,
        "below_k": sum(n for n in sizes if n < k),
    }


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
