"""Clinical notes released scrubbed: what identifies the patient taken out, the rest kept.

Theory of operation
-------------------
A note is the most useful part of a record for the clinician who pulls it, so the ``notes``
profile releases it scrubbed rather than dropped. :func:`scrub_note` finds, in order of
precedence where two overlap:

1. **the patient's own identifiers**, from its Patient resource (:class:`PatientFacts`):
   every name token of the patient, its relatives and contacts (with or without Synthea's
   trailing digits, in any case, in any order), initials, a Chinese name as written and
   romanized (pinyin, either order, with or without a space), address lines, streets,
   cities and postal codes, phone numbers (by their digits, however they are written),
   identifier values and e-mail addresses;
2. **dates**, in the common English and Chinese forms (ISO, 3/4/2021, March 4, 2021,
   4 Mar 2021, March 2021, March 4, 2021年3月4日, 二〇二一年三月四日, 3月4日): each is moved by
   the patient's offset and written back in its own form, so intervals survive and the
   note agrees with the record's shifted dates (without an offset a date is replaced);
3. **ages over 89** ("95 year-old", "Age: 95", "95 y.o.", "92岁", "九十二岁"): the number
   becomes "90+";
4. **identifying patterns**: e-mail, URL, IP, SSN, 18-character resident ids (spaces
   allowed), mainland mobile and landline numbers, North American numbers (with or
   without area code), labelled record numbers, street addresses, Chinese addresses,
   ZIP codes, and any run of six or more digits;
5. **other people's names**, by dictionary: a title (Dr., Mrs., Nurse, 医生, 先生, ...)
   with a name, a given name from the US Census list followed by a surname from it (both
   capitalized), a Chinese surname with one or two more characters and a title, or after
   a label such as 家属 or 联系人.

Everything found is replaced by a typed marker ("[NAME]", "[ADDRESS]", "[PHONE]", "[ID]",
"[EMAIL]", "[URL]") except dates and ages, which are rewritten. What is not caught: a
name of another person written without a title and not as a listed given name and
surname pair; a name that is also a common word written in lower case; places named
without a street type or a known line; free-form ages ("in her nineties"). The
benchmark ``benchmarks/deid_quality.py`` measures recall and precision.

Name lists: US Census Bureau 1990 surname and given-name frequency files (public domain;
``names/NOTICE``), and the common Chinese surnames. No model is loaded or downloaded.
"""

from __future__ import annotations

import bisect
import importlib.resources
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import cache, lru_cache
from typing import Any

from .text import EMAIL_PATTERN, IP_PATTERN, LONG_NUMBER_PATTERN, NOT_ALNUM_AFTER, NOT_ALNUM_BEFORE, SSN_PATTERN

#: Markers that replace what is taken out.
MARKERS = {"name": "[NAME]", "address": "[ADDRESS]", "phone": "[PHONE]", "id": "[ID]", "email": "[EMAIL]",
           "url": "[URL]", "date": "[DATE]"}
_CJK = "\u4e00-\u9fff"
_HAN = re.compile(f"[{_CJK}]")


@dataclass(frozen=True)
class Finding:
    """One thing a scrub found: its kind, where it was (in the original text) and what replaced it."""

    kind: str
    start: int
    end: int
    replacement: str


@dataclass(frozen=True)
class Scrubbed:
    text: str
    findings: tuple[Finding, ...] = ()


# --- what the Patient resource says ------------------------------------------------------


@dataclass(frozen=True)
class PatientFacts:
    """The identifying values of one Patient resource, as a note may write them."""

    #: Latin name tokens (letters only, lower case), the patient's and its relatives'.
    names: frozenset[str] = frozenset()
    #: Initials pairs of the patient's names ("sl" for Sumiko Larue).
    initials: frozenset[str] = frozenset()
    #: Chinese names as written, and their romanized forms (lower case, syllables spaced).
    han: frozenset[str] = frozenset()
    romanized: frozenset[tuple[str, ...]] = frozenset()
    #: Phone numbers by their digits (at least 5).
    digits: frozenset[str] = frozenset()
    #: Identifier values and e-mail addresses (lower case).
    ids: frozenset[str] = frozenset()
    #: Address lines, streets, cities (lower case).
    places: frozenset[str] = frozenset()
    postal_codes: frozenset[str] = frozenset()

    @classmethod
    def of(cls, patient: Mapping[str, Any] | None) -> PatientFacts:
        if not isinstance(patient, Mapping):
            return cls()
        names: set[str] = set()
        initials: set[str] = set()
        han: set[str] = set()
        romanized: set[tuple[str, ...]] = set()
        digits: set[str] = set()
        ids: set[str] = set()
        places: set[str] = set()
        postal: set[str] = set()

        def add_name(name: Any, own: bool) -> None:
            if not isinstance(name, Mapping):
                return
            parts = [p for p in _strings(name.get("given")) + _strings(name.get("family")) + _strings(name.get("text"))]
            latin = []
            for part in parts:
                for token in re.findall(r"[^\W\d_]+", part):
                    if _HAN.search(token):
                        if len(token) >= 2:
                            _add_han(token, han, romanized)
                    elif len(token) >= 2:
                        names.add(token.casefold())
                        latin.append(token)
            given = [t for t in re.findall(r"[^\W\d_]+", " ".join(_strings(name.get("given"))))
                     if not _HAN.search(t)]
            family = [t for t in re.findall(r"[^\W\d_]+", " ".join(_strings(name.get("family"))))
                      if not _HAN.search(t)]
            if own and given and family:
                initials.add((given[0][0] + family[-1][0]).casefold())
            family_han = "".join(t for t in _strings(name.get("family")) if _HAN.search(t))
            given_han = "".join(t for t in _strings(name.get("given")) if _HAN.search(t))
            if family_han and given_han:
                _add_han(family_han + given_han, han, romanized, family=len(family_han))
                if len(given_han) >= 2:  # a one-character given name is also an everyday word
                    _add_han(given_han, han, romanized)

        for name in patient.get("name") or ():
            add_name(name, True)
        for contact in patient.get("contact") or ():
            if isinstance(contact, Mapping):
                add_name(contact.get("name"), False)
                for telecom in contact.get("telecom") or ():
                    _add_contact_point(telecom, digits, ids)
                _add_address(contact.get("address"), places, postal)
        for ext in patient.get("extension") or ():
            if isinstance(ext, Mapping) and str(ext.get("url", "")).endswith("mothersMaidenName"):
                add_name({"family": ext.get("valueString")}, False)
            if isinstance(ext, Mapping) and str(ext.get("url", "")).endswith("birthPlace"):
                _add_address(ext.get("valueAddress"), places, postal)
        for telecom in patient.get("telecom") or ():
            _add_contact_point(telecom, digits, ids)
        for address in patient.get("address") or ():
            _add_address(address, places, postal)
        for identifier in patient.get("identifier") or ():
            value = identifier.get("value") if isinstance(identifier, Mapping) else None
            if isinstance(value, str) and value.strip():
                ids.add(value.strip().casefold())
        return cls(frozenset(names), frozenset(initials), frozenset(han), frozenset(romanized),
                   frozenset(digits), frozenset(v for v in ids if len(v) >= 3),
                   frozenset(v for v in places if len(v) >= 3), frozenset(postal))


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _add_han(name: str, han: set[str], romanized: set[tuple[str, ...]], family: int = 1) -> None:
    """A Chinese name as written and romanized; ``family``: how many characters the surname has."""
    from pypinyin import Style, pinyin  # its dictionary loads in ~0.1 s: only for a Chinese name

    han.add(name)
    # Every reading of each character (a surname is often read otherwise than the word: 曾 is
    # Zeng as a name, ceng as a word), at most 16 spellings a name.
    spellings: list[tuple[str, ...]] = [()]
    for readings in pinyin(name, style=Style.NORMAL, heteronym=True):
        spellings = [s + (r.casefold(),) for s in spellings for r in readings[:4] if r.isalpha()][:16]
    for syllables in spellings:
        if syllables:
            romanized.add(syllables)
            if len(syllables) > family:
                romanized.add(syllables[family:] + syllables[:family])  # given name first, as English writes it


def _add_contact_point(telecom: Any, digits: set[str], values: set[str]) -> None:
    value = telecom.get("value") if isinstance(telecom, Mapping) else None
    if not isinstance(value, str):
        return
    number = re.sub(r"\D", "", value)
    if telecom.get("system") in ("phone", "fax", "sms", "pager") and len(number) >= 5:
        digits.add(number)
    elif value.strip():
        values.add(value.strip().casefold())


def _add_address(address: Any, values: set[str], postal: set[str]) -> None:
    if not isinstance(address, Mapping):
        return
    for line in _strings(address.get("line")):
        values.add(line.strip().casefold())
        street = re.sub(r"^\s*\d+[A-Za-z]?\s+", "", line).strip()
        street = re.sub(r"\s+(?:unit|apt\.?|suite|#)\s*\S+$", "", street, flags=re.IGNORECASE)
        if len(street) >= 4:
            values.add(street.casefold())
    for key in ("city", "district"):
        for value in _strings(address.get(key)):
            if len(value.strip()) >= 3:
                values.add(value.strip().casefold())
    for value in _strings(address.get("postalCode")):
        code = re.sub(r"\s", "", value)
        if len(code) >= 3:
            postal.add(code[:5] if code[:5].isdigit() else code)


# --- name lists ---------------------------------------------------------------------------


@cache
def _names(file: str) -> frozenset[str]:
    text = (importlib.resources.files(__package__) / "names" / file).read_text(encoding="utf-8")
    return frozenset(line.strip().casefold() for line in text.splitlines() if line.strip())


#: Names that are also everyday English words: matched as the patient's name only when
#: capitalized, and never taken as another person's name from the dictionary alone.
_WORDS = frozenset("""
will may june april august mark hope grace faith joy rose ruby amber dawn summer rich young white brown green
black gray grey king long little bell hall hill wood page park rice rose star storm sun ray art bill bob sue
pat don guy kay lee lynn major miles mills noble price rich rivers rock rush sharp short small snow stone street
strong tree trip victor wade walker ward waters wells west wise woods worth frank earnest chance sterling
""".split())
_TITLES = r"(?:Dr|Drs|Doctor|Mr|Mrs|Ms|Miss|Mx|Prof|Professor|Nurse|Sister|Rev|Fr|Capt|Sgt)"
_CN_TITLES = "医生|大夫|护士|护师|主任|院长|教授|先生|女士|小姐|老师|同志|阿姨|师傅"
_CN_LABELS = "患者|病人|家属|联系人|监护人|父亲|母亲|丈夫|妻子|儿子|女儿|配偶|姓名|签名|陪护"
#: Single-character surnames that are also common words: taken only with a given name.
_CN_AMBIGUOUS = frozenset("和都那来由时信明平国公元干但相初门云容敬利居衣展阴智幸富海花权强帅支文成高方石")


# --- the patterns -------------------------------------------------------------------------

_NOT_ALNUM_BEFORE, _NOT_ALNUM_AFTER = NOT_ALNUM_BEFORE, NOT_ALNUM_AFTER
_MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
           "november", "december"]
_MONTH = r"(?P<mon>jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?" \
         r"|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
_CN_DIGITS = "〇零一二三四五六七八九十两"
_DATE_PATTERNS = [
    ("iso", _NOT_ALNUM_BEFORE + r"(?P<y>\d{4})-(?P<m>\d{1,2})-(?P<d>\d{1,2})(?![\d])"),
    ("ymd_slash", _NOT_ALNUM_BEFORE + r"(?P<y>\d{4})/(?P<m>\d{1,2})/(?P<d>\d{1,2})" + _NOT_ALNUM_AFTER),
    ("mdy", _NOT_ALNUM_BEFORE + r"(?P<m>\d{1,2})(?P<sep>[/-])(?P<d>\d{1,2})(?P=sep)(?P<y>\d{4}|\d{2})"
     + _NOT_ALNUM_AFTER),
    ("dmy_dot", _NOT_ALNUM_BEFORE + r"(?P<d>\d{1,2})\.(?P<m>\d{1,2})\.(?P<y>\d{4})" + _NOT_ALNUM_AFTER),
    ("month_d_y", _NOT_ALNUM_BEFORE + _MONTH + r"\s+(?P<d>\d{1,2})(?:st|nd|rd|th)?,?\s+(?P<y>\d{4})"
     + _NOT_ALNUM_AFTER),
    ("d_month_y", _NOT_ALNUM_BEFORE + r"(?P<d>\d{1,2})(?:st|nd|rd|th)?\s+(?:of\s+)?" + _MONTH + r",?\s+(?P<y>\d{4})"
     + _NOT_ALNUM_AFTER),
    ("month_y", _NOT_ALNUM_BEFORE + _MONTH + r",?\s+(?P<y>(?:19|20)\d{2})" + _NOT_ALNUM_AFTER),
    ("month_d", _NOT_ALNUM_BEFORE + _MONTH + r"\s+(?P<d>\d{1,2})(?:st|nd|rd|th)?" + r"(?![0-9A-Za-z]|,?\s+\d)"),
    ("cn_ymd", r"(?P<y>\d{4})\s*年\s*(?P<m>\d{1,2})\s*月\s*(?P<d>\d{1,2})\s*[日号]"),
    ("cn_ym", r"(?P<y>\d{4})\s*年\s*(?P<m>\d{1,2})\s*月(?!\s*\d)"),
    ("cn_md", r"(?<![\d年])(?P<m>\d{1,2})\s*月\s*(?P<d>\d{1,2})\s*[日号]"),
    ("cn_num_ymd", f"(?P<y>[{_CN_DIGITS}]{{4}})年(?P<m>[{_CN_DIGITS}]{{1,3}})月(?P<d>[{_CN_DIGITS}]{{1,3}})[日号]"),
    ("cn_num_md", f"(?<![年{_CN_DIGITS}])(?P<m>[{_CN_DIGITS}]{{1,3}})月(?P<d>[{_CN_DIGITS}]{{1,3}})[日号]"),
]
_DATES = [(kind, re.compile(pattern, re.IGNORECASE)) for kind, pattern in _DATE_PATTERNS]

_AGE = re.compile(
    r"(?P<n>(?<!\d)(?:9\d|1[0-4]\d))(?=\s*(?:-|\s)?\s*(?:years?|yrs?|yo|y\.\s?o\.?|y/o)" + _NOT_ALNUM_AFTER
    + r"|-year)"
    r"|(?:(?<![A-Za-z])(?:age[d]?|aged)\s*[:：]?\s*)(?P<n2>(?:9\d|1[0-4]\d))(?!\d)"
    r"|(?P<n3>(?<!\d)(?:9\d|1[0-4]\d))(?=\s*周?岁)"
    r"|(?P<n4>(?:九十[一二三四五六七八九]?|一百(?:零[一二三四五六七八九]|[一二三四]十?[一二三四五六七八九]?)?))(?=\s*周?岁)",
    re.IGNORECASE)

_PATTERNS: list[tuple[str, str]] = [
    ("email", EMAIL_PATTERN),
    ("url", r"(?:https?|ftp)://[^\s<>\"'）)]+|www\.[^\s<>\"'）)]+"),
    ("id", IP_PATTERN),
    ("id", r"(?<![\dA-Za-z])\d{6}[\s-]?\d{4}[\s-]?\d{2}[\s-]?\d{2}[\s-]?\d{3}[\dXx](?![\dA-Za-z])"),
    ("id", SSN_PATTERN),
    ("phone", r"(?<![\d+])(?:\+?86[-\s]?)?1[3-9]\d[-\s]?\d{4}[-\s]?\d{4}(?!\d)"),
    ("phone", r"(?<![\d+])(?:\(0\d{2,3}\)|0\d{2,3})[-\s]?\d{3,4}[-\s]?\d{4}(?!\d)"),
    ("phone", r"(?<![\d+])(?:\+?1[-.\s]?)?(?:\(\d{3}\)\s?|\d{3}[-.\s])\d{3}[-.\s]\d{4}(?!\d)"),
    ("phone", r"(?<![\d-])\d{3}-\d{4}(?![\d-])"),
    ("id", r"(?:MRN|MR#|[Mm]edical [Rr]ecord(?: [Nn]umber| [Nn]o\.?)?|[Aa]ccount(?: [Nn]umber| [Nn]o\.?)?"
           r"|[Pp]atient [Ii][Dd]|SSN|病历号|住院号|门诊号|病案号|身份证号?|医保卡?号)\s*[:#：]?\s*"
           r"(?P<value>[A-Za-z0-9-]*\d[A-Za-z0-9-]*)"),
    ("address", r"(?<![\dA-Za-z])\d{1,5}\s+(?:[A-Z][A-Za-z'-]+\s+){1,3}"
                r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|Terrace|Ter"
                r"|Parkway|Pkwy|Landing|Circle|Cir|Trail|Trl|Highway|Hwy|Square|Sq|Row|Crossing|Alley|Loop|Path"
                r"|Ridge|Run|Walk|Gardens|Heights|Station|Port|Throughway|Turnpike|Park|Green|Route)\b\.?"
                r"(?:,?\s+(?:Unit|Apt\.?|Suite|#)\s*[A-Za-z0-9-]+)?"),
    ("address", f"(?:[{_CJK}]{{2,8}}(?:省|自治区|市|区|县|镇|乡|村|街道|大道|路|街|巷|弄|胡同|小区))+"
                f"(?:[\\d一二三四五六七八九十百零〇]+(?:号|弄|栋|楼|单元|室))*"),
    ("address", r"(?<=\b[A-Z]{2}\s)\d{5}(?:-\d{4})?(?!\d)|(?<=ZIP\s)\d{5}|(?<=ZIP:\s)\d{5}|(?<=zip code\s)\d{5}"),
    ("address", r"(?<![\d.,/-])\d{5}(?:-\d{4})?(?![\d.,/-])(?!\s*(?:mg|mcg|ml|mL|g|kg|units?|iu|IU|%|/|cells|copies))"),
    ("id", LONG_NUMBER_PATTERN),
]
_PATTERN_RES = [(kind, re.compile(pattern)) for kind, pattern in _PATTERNS]
_TITLED = re.compile(_TITLES + r"\.?\s+(?:[A-Z]\.\s*)?[A-Z][A-Za-z'-]+(?:[- ][A-Z][A-Za-z'-]+)?")
_CAPITALIZED_PAIR = re.compile(r"(?<![A-Za-z])([A-Z][a-z'-]+)\s+(?:[A-Z]\.\s+)?([A-Z][a-z'-]+)(?![A-Za-z])")


@cache
def _cn_name_patterns() -> tuple[re.Pattern[str], re.Pattern[str]]:
    surnames = sorted(_names("cn_surnames.txt"), key=len, reverse=True)
    plain = "|".join(re.escape(s) for s in surnames if s not in _CN_AMBIGUOUS)
    ambiguous = "|".join(re.escape(s) for s in surnames if s in _CN_AMBIGUOUS)
    titled = re.compile(f"(?:(?:{plain})[{_CJK}]{{0,2}}|(?:{ambiguous})[{_CJK}]{{1,2}})(?={_CN_TITLES})")
    labelled = re.compile(f"(?:{_CN_LABELS})[：:\\s]*(?P<name>(?:{plain}|{ambiguous})[{_CJK}]{{1,2}})")
    return titled, labelled


# --- finding ------------------------------------------------------------------------------


@dataclass
class _Spans:
    """Non-overlapping findings, kept in order: an earlier (higher-precedence) one wins a conflict."""

    taken: list[Finding] = field(default_factory=list)  # sorted by start, hence by end too

    def add(self, kind: str, start: int, end: int, replacement: str) -> None:
        if start >= end:
            return
        # The findings overlapping [start, end) are a run: from the first ending after start.
        first = last = bisect.bisect_right(self.taken, start, key=lambda f: f.end)
        while last < len(self.taken) and self.taken[last].start < end:
            last += 1
        overlapping = self.taken[first:last]
        if overlapping and not all(f.kind == kind and f.replacement == replacement for f in overlapping):
            return
        if overlapping:
            # Two finds of one kind that overlap are one ("梁志强" over the given name "志强").
            start, end = min(start, overlapping[0].start), max(end, overlapping[-1].end)
        self.taken[first:last] = [Finding(kind, start, end, replacement)]

    def apply(self, text: str) -> Scrubbed:
        out, last = [], 0
        found = tuple(sorted(self.taken, key=lambda f: f.start))
        for finding in found:
            out.append(text[last:finding.start])
            out.append(finding.replacement)
            last = finding.end
        out.append(text[last:])
        return Scrubbed("".join(out), found)


def scrub_note(text: str, facts: PatientFacts | None = None, offset_days: int | None = None) -> Scrubbed:
    """``text`` with the patient's identifiers, dates, ages over 89, identifying patterns and
    other people's names taken out (see the module docstring); with the findings."""
    spans = _Spans()
    for kind, regex in _PATTERN_RES[:2]:  # e-mail addresses and URLs hold names: whole first
        for m in regex.finditer(text):
            spans.add(kind, m.start(), m.end(), MARKERS[kind])
    if facts is not None:
        for kind, regex in _facts_patterns(facts):
            for m in regex.finditer(text):
                if kind == "name" and m.group(0).casefold() in _WORDS and not m.group(0)[:1].isupper():
                    continue
                spans.add(kind, m.start(), m.end(), MARKERS[kind])
        if facts.digits:
            for m in re.finditer(r"(?<![\d])\+?\d[\d\s().-]{3,}\d(?!\d)", text):
                number = re.sub(r"\D", "", m.group(0))
                if len(number) >= 5 and any(number.endswith(d[-7:]) or d.endswith(number) and len(number) >= 7
                                            for d in facts.digits):
                    spans.add("phone", m.start(), m.end(), MARKERS["phone"])
    found = sorted(((m.start(), order, kind, m) for order, (kind, regex) in enumerate(_DATES)
                    for m in regex.finditer(text)), key=lambda f: (f[0], f[1]))
    year = None  # a date without a year is taken to be in the year of the full date before it
    for _, _, kind, m in found:
        spans.add("date", m.start(), m.end(), _shifted(kind, m, offset_days, year))
        year = _year_of(kind, m) or year
    for m in _AGE.finditer(text):
        group = next(g for g in ("n", "n2", "n3", "n4") if m.group(g) is not None)
        spans.add("age", m.start(group), m.end(group), "90+")
    for kind, regex in _PATTERN_RES:
        for m in regex.finditer(text):
            # A labelled number: the label stays ("MRN: [ID]"), only the number goes.
            labelled = "value" in regex.groupindex and m.group("value")
            start, end = (m.start("value"), m.end("value")) if labelled else (m.start(), m.end())
            spans.add(kind, start, end, MARKERS[kind])
    _other_names(text, spans)
    return spans.apply(text)


@lru_cache(maxsize=4096)
def _facts_patterns(facts: PatientFacts) -> list[tuple[str, re.Pattern[str]]]:
    patterns: list[tuple[str, re.Pattern[str]]] = []

    def alternation(values: Iterable[str]) -> str:
        return "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))

    if facts.ids:
        # An identifier however it is grouped: a space or a hyphen may sit between any two characters.
        grouped = "|".join(r"[\s-]?".join(re.escape(c) for c in value if not c.isspace())
                         for value in sorted(facts.ids, key=len, reverse=True))
        patterns.append(("id", re.compile(f"(?<![0-9A-Za-z])(?:{grouped})(?![0-9A-Za-z])", re.IGNORECASE)))
    if facts.places:
        # Address parts before names: a line holds the names of streets, not of people.
        patterns.append(("address", re.compile(f"(?<![0-9A-Za-z]){_whitespace(alternation(facts.places))}"
                                               f"(?![0-9A-Za-z])", re.IGNORECASE)))
    if facts.postal_codes:
        patterns.append(("address", re.compile(f"(?<![0-9A-Za-z])(?:{alternation(facts.postal_codes)})"
                                               f"(?:-\\d{{4}})?(?![0-9A-Za-z])", re.IGNORECASE)))
    if facts.romanized:
        spelled = {r"[\s-]?".join(re.escape(s) for s in syllables) for syllables in facts.romanized}
        patterns.append(("name", re.compile(f"(?<![A-Za-z])(?:{'|'.join(sorted(spelled, key=len, reverse=True))})"
                                            f"(?![A-Za-z])", re.IGNORECASE)))
    if facts.han:
        patterns.append(("name", re.compile(alternation(facts.han))))
    if facts.names:
        # With the initial of a given name before it, if there is one ("E. Hernandez").
        patterns.append(("name", re.compile(f"(?:(?<![A-Za-z])[A-Za-z]\\.\\s?)?(?<![^\\W\\d_])"
                                            f"(?:{alternation(facts.names)})\\d*(?![^\\W\\d_])", re.IGNORECASE)))
    if facts.initials:
        pairs = [f"{re.escape(i[0])}\\.\\s?{re.escape(i[1])}\\." for i in facts.initials]
        patterns.append(("name", re.compile(f"(?<![A-Za-z])(?:{'|'.join(pairs)})", re.IGNORECASE)))
    return patterns


def _whitespace(pattern: str) -> str:
    """Let any run of spaces in an escaped value match any run of white space."""
    return pattern.replace(r"\ ", r"\s+")


def _other_names(text: str, spans: _Spans) -> None:
    for m in _TITLED.finditer(text):
        spans.add("name", m.start(), m.end(), MARKERS["name"])
    given, surnames = _names("given.txt"), _names("surnames.txt")
    for m in _CAPITALIZED_PAIR.finditer(text):
        first, last = m.group(1).casefold(), m.group(2).casefold()
        if first in given and last in surnames and first not in _WORDS:
            spans.add("name", m.start(), m.end(), MARKERS["name"])
    titled, labelled = _cn_name_patterns()
    for m in titled.finditer(text):
        spans.add("name", m.start(), m.end(), MARKERS["name"])
    for m in labelled.finditer(text):
        spans.add("name", m.start("name"), m.end("name"), MARKERS["name"])


# --- dates --------------------------------------------------------------------------------


def _year_of(kind: str, m: re.Match[str]) -> int | None:
    y = m.groupdict().get("y")
    if not y:
        return None
    try:
        return _cn_number(y, digits=True) if kind.startswith("cn_num") else _full_year(y)
    except (KeyError, ValueError):
        return None


def _shifted(kind: str, m: re.Match[str], days: int | None, year: int | None = None) -> str:
    """The date ``m`` found, moved by ``days`` and written in its own form (one without a year
    taken in ``year``, else in a leap year); a marker when it cannot be (no offset, or not a
    real date)."""
    if days is None:
        return MARKERS["date"]
    try:
        return _render(kind, m, days, year or 2000)
    except (ValueError, OverflowError, KeyError):
        return MARKERS["date"]


def _render(kind: str, m: re.Match[str], days: int, context_year: int) -> str:
    text = m.group(0)
    groups = m.groupdict()
    if kind in ("cn_num_ymd", "cn_num_md"):
        year = _cn_number(groups["y"], digits=True) if groups.get("y") else context_year
        day = date(year, _cn_number(groups["m"]), _cn_number(groups["d"])) + timedelta(days=days)
        head = f"{_cn_digits(day.year)}年" if groups.get("y") else ""
        return f"{head}{_cn_small(day.month)}月{_cn_small(day.day)}{text[-1]}"
    month = _month(groups)
    if kind in ("month_y", "cn_ym"):
        middle = date(int(groups["y"]), month, 15) + timedelta(days=days)
        if kind == "cn_ym":
            return f"{middle.year}年{middle.month}月"
        return f"{_month_name(groups['mon'], middle.month)} {middle.year}"
    year_text = groups.get("y")
    year = _full_year(year_text) if year_text else context_year
    day = date(year, month, int(groups["d"])) + timedelta(days=days)
    if kind == "iso":
        return f"{day.year:04d}-{day.month:0{len(groups['m'])}d}-{day.day:0{len(groups['d'])}d}"
    if kind == "ymd_slash":
        return f"{day.year:04d}/{day.month:0{len(groups['m'])}d}/{day.day:0{len(groups['d'])}d}"
    if kind == "mdy":
        shown_year = f"{day.year % 100:02d}" if len(year_text or "") == 2 else f"{day.year:04d}"
        sep = groups["sep"]
        return f"{day.month:0{len(groups['m'])}d}{sep}{day.day:0{len(groups['d'])}d}{sep}{shown_year}"
    if kind == "dmy_dot":
        return f"{day.day:0{len(groups['d'])}d}.{day.month:0{len(groups['m'])}d}.{day.year:04d}"
    if kind == "month_d_y":
        comma = "," if "," in text else ""
        return f"{_month_name(groups['mon'], day.month)} {day.day}{comma} {day.year}"
    if kind == "d_month_y":
        return f"{day.day} {_month_name(groups['mon'], day.month)} {day.year}"
    if kind == "month_d":
        return f"{_month_name(groups['mon'], day.month)} {day.day}"
    if kind == "cn_ymd":
        return f"{day.year}年{day.month}月{day.day}{text.rstrip()[-1]}"
    if kind == "cn_md":
        return f"{day.month}月{day.day}{text.rstrip()[-1]}"
    raise KeyError(kind)


def _month(groups: Mapping[str, str | None]) -> int:
    if groups.get("mon"):
        name = groups["mon"].rstrip(".").casefold()  # type: ignore[union-attr]
        return next(i + 1 for i, full in enumerate(_MONTHS) if full.startswith(name[:3]))
    return int(groups["m"])  # type: ignore[arg-type]


def _month_name(written: str, month: int) -> str:
    """Month ``month`` written as ``written`` was: full or abbreviated, its case, its dot."""
    full = _MONTHS[month - 1]
    bare = written.rstrip(".")
    name = full if len(bare) > 3 and bare.casefold() != "sept" else full[:3]
    if bare.isupper():
        name = name.upper()
    elif bare[:1].isupper():
        name = name.capitalize()
    return name + ("." if written.endswith(".") and len(name) == 3 else "")


def _full_year(text: str) -> int:
    year = int(text)
    if len(text) == 2:
        year += 2000 if year <= date.today().year % 100 else 1900
    return year


_CN_VALUE = {c: i for i, c in enumerate("〇一二三四五六七八九")} | {"零": 0, "两": 2}


def _cn_number(text: str, *, digits: bool = False) -> int:
    """A number written in Chinese numerals: digit by digit (a year), or with 十 (a month, a day)."""
    if digits or "十" not in text:
        return int("".join(str(_CN_VALUE[c]) for c in text))
    tens, _, units = text.partition("十")
    return (_CN_VALUE[tens] if tens else 1) * 10 + (_CN_VALUE[units] if units else 0)


def _cn_digits(number: int) -> str:
    return "".join("〇一二三四五六七八九"[int(d)] for d in str(number))


def _cn_small(number: int) -> str:
    """1..31 in Chinese numerals (三, 十二, 二十五)."""
    tens, units = divmod(number, 10)
    head = "" if tens == 0 else ("十" if tens == 1 else "一二三"[tens - 1] + "十")
    return head + ("" if units == 0 else "一二三四五六七八九"[units - 1]) if number >= 10 else \
        "一二三四五六七八九"[number - 1]
