"""Measuring the notes scrubber against known truth: recall, precision, and words kept.

An identifier counts as caught when every character of it lies inside findings, and a date
only when the finding that covers it rewrote it (a date left as it was is a miss, even if
found). Precision is the share of findings that overlap something identifying. Words kept
is the share of the note's other words (letters, or Chinese characters) that no finding
touched: how much of the clinical text survives.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .notes import Finding, PatientFacts, scrub_note

_WORD = re.compile(r"[A-Za-z]{2,}|[\u4e00-\u9fff]")
_ISO_DATE = re.compile(r"(?<!\d)\d{4}-\d{2}-\d{2}(?!\d)")


class Span(Protocol):
    """An identifier known to be in a note: its kind and where it stands."""

    @property
    def kind(self) -> str: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...


@dataclass(frozen=True)
class Truth:
    kind: str
    start: int
    end: int


@dataclass
class Score:
    identifiers: int = 0
    caught: int = 0
    missed: Counter[str] = field(default_factory=Counter)
    findings: int = 0
    true_findings: int = 0
    words: int = 0
    words_kept: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def recall(self) -> float:
        return self.caught / self.identifiers if self.identifiers else 1.0

    @property
    def precision(self) -> float:
        return self.true_findings / self.findings if self.findings else 1.0

    @property
    def kept(self) -> float:
        return self.words_kept / self.words if self.words else 1.0

    def __add__(self, other: Score) -> Score:
        return Score(self.identifiers + other.identifiers, self.caught + other.caught, self.missed + other.missed,
                     self.findings + other.findings, self.true_findings + other.true_findings,
                     self.words + other.words, self.words_kept + other.words_kept, self.examples + other.examples)

    def view(self) -> dict[str, Any]:
        return {"identifiers": self.identifiers, "caught": self.caught, "recall": round(self.recall, 5),
                "missed": dict(self.missed), "findings": self.findings, "precision": round(self.precision, 5),
                "words": self.words, "words_kept": round(self.kept, 5)}


def score_note(text: str, truth: Sequence[Span], findings: Sequence[Finding], into: Score) -> None:
    """Add one note's counts to ``into``."""
    for item in truth:
        into.identifiers += 1
        covered = _covered(item, findings, text)
        if covered:
            into.caught += 1
        else:
            into.missed[item.kind] += 1
            if len(into.examples) < 20:
                into.examples.append(f"{item.kind}: {text[max(0, item.start - 20):item.end + 20]!r}")
    for finding in findings:
        into.findings += 1
        if any(finding.start < t.end and t.start < finding.end for t in truth) or finding.kind in ("date", "age"):
            into.true_findings += 1  # a rewritten date or age is what the profile asks for, found or planted
    for m in _WORD.finditer(text):
        if any(m.start() < t.end and t.start < m.end() for t in truth):
            continue
        into.words += 1
        if not any(m.start() < f.end and f.start < m.end() for f in findings):
            into.words_kept += 1


def _covered(item: Span, findings: Sequence[Finding], text: str = "") -> bool:
    """Whether every letter and digit of ``item`` lies in a finding (the spaces and
    punctuation between two names found apart identify nothing)."""
    spans = [f for f in findings if f.start < item.end and item.start < f.end]
    if item.kind == "date" and any(f.kind != "date" for f in spans):
        return False
    for i in range(item.start, item.end):
        if text and not text[i].isalnum():
            continue
        if not any(f.start <= i < f.end for f in spans):
            return False
    return bool(spans)


def synthea_truth(text: str, patient: Mapping[str, Any]) -> list[Truth]:
    """What identifies a Synthea patient in one of its notes, found without the scrubber: each
    occurrence of a name as written (with its digits), an address line, a city, a postal code,
    a phone number or an identifier value, and each ISO date."""
    needles: list[tuple[str, str]] = []
    for name in patient.get("name") or ():
        for part in [*(name.get("given") or []), name.get("family")]:
            if isinstance(part, str) and len(part) >= 2:
                needles.append(("name", part))
    for ext in patient.get("extension") or ():
        if str(ext.get("url", "")).endswith("mothersMaidenName") and isinstance(ext.get("valueString"), str):
            needles.extend(("name", part) for part in ext["valueString"].split())
    for address in patient.get("address") or ():
        needles.extend(("address", line) for line in address.get("line") or ())
        for key in ("city", "postalCode"):
            if isinstance(address.get(key), str):
                needles.append(("address", address[key]))
    for telecom in patient.get("telecom") or ():
        if isinstance(telecom.get("value"), str):
            needles.append(("phone", telecom["value"]))
    for identifier in patient.get("identifier") or ():
        if isinstance(identifier.get("value"), str):
            needles.append(("id", identifier["value"]))
    truth = []
    for kind, needle in needles:
        for m in re.finditer(rf"(?<![0-9A-Za-z]){re.escape(needle)}(?![0-9A-Za-z])", text):
            truth.append(Truth(kind, m.start(), m.end()))
    truth.extend(Truth("date", m.start(), m.end()) for m in _ISO_DATE.finditer(text))
    return _disjoint(truth)


def _disjoint(truth: Iterable[Truth]) -> list[Truth]:
    out: list[Truth] = []
    for item in sorted(truth, key=lambda t: (t.start, -(t.end - t.start))):
        if not out or item.start >= out[-1].end:
            out.append(item)
    return out


def measure(notes: Iterable[tuple[str, Mapping[str, Any], Sequence[Span]]], offset: int = -41) -> Score:
    """Score the scrubber over (text, Patient, truth) triples."""
    total = Score()
    for text, patient, truth in notes:
        scrubbed = scrub_note(text, PatientFacts.of(patient), offset)
        score_note(text, truth, scrubbed.findings, total)
    return total
