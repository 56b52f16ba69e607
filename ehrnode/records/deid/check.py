"""What a profile would release, and what it removed or changed: a privacy officer's report.

:func:`check` de-identifies resources exactly as recording would (every resource with its
patient's facts and offset, Patients at k-anonymity level 0 or the level given) and, for
each one, lists every element removed, changed or added, by path; free text released
scrubbed also gets the count of what was found in it, by kind. Nothing is recorded.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ...errors import DeidentificationError
from .. import fhir
from .engine import Deidentifier
from .notes import PatientFacts

_INDEX = re.compile(r"\[\d+\]")


@dataclass
class Checked:
    """One resource: its release (None if it cannot be released, with why), and the changes."""

    source: str
    resource_type: str
    resource_id: str
    released: dict[str, Any] | None
    error: str | None = None
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    #: In free text released scrubbed: what was found, by kind (name, date, phone, ...).
    found: Counter[str] = field(default_factory=Counter)

    def view(self, *, with_release: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "resource_type": self.resource_type, "id": self.resource_id,
                               "removed": self.removed, "changed": self.changed, "added": self.added,
                               "found_in_text": dict(self.found)}
        if self.error is not None:
            out["error"] = self.error
        if with_release:
            out["released"] = self.released
        return out


def check(items: Iterable[fhir.Item], deid: Deidentifier, *, level: int = 0) -> list[Checked]:
    """Each item as it would be released (see the module docstring)."""
    items = list(items)
    patients = {item.resource_id: item.resource for item in items if item.resource_type == "Patient"}
    facts: dict[str, PatientFacts] = {}
    out = []
    for item in items:
        resource = item.resource
        pid = fhir.patient_id(resource) if fhir.is_patient_data(resource) else None
        patient = pid or item.resource_id or ""
        if pid is not None and pid not in facts:
            facts[pid] = PatientFacts.of(patients.get(pid))
        checked = Checked(item.source, item.resource_type or "?", item.resource_id or "?", None)
        try:
            found: Counter[str] = Counter()  # kept only for a resource released
            released = deid.deidentify(resource, patient=patient, level=level,
                                       facts=facts.get(pid) if pid else None, found=found)
        except DeidentificationError as exc:
            checked.error = str(exc)
            out.append(checked)
            continue
        checked.released, checked.found = released, found
        _diff(resource, released, "", checked)
        out.append(checked)
    return out


def summary(results: Iterable[Checked]) -> dict[str, Any]:
    """Counts over every resource: removed, changed and added elements by path (list positions
    folded, ``name[].given``), what free text held, and how many resources could not be released."""
    removed: Counter[str] = Counter()
    changed: Counter[str] = Counter()
    added: Counter[str] = Counter()
    found: Counter[str] = Counter()
    resources = refused = 0
    for r in results:
        resources += 1
        refused += r.error is not None
        removed.update(f"{r.resource_type}.{_INDEX.sub('[]', p)}" for p in r.removed)
        changed.update(f"{r.resource_type}.{_INDEX.sub('[]', p)}" for p in r.changed)
        added.update(f"{r.resource_type}.{_INDEX.sub('[]', p)}" for p in r.added)
        found.update(r.found)
    return {"resources": resources, "unreleasable": refused, "removed": dict(removed.most_common()),
            "changed": dict(changed.most_common()), "added": dict(added.most_common()),
            "found_in_text": dict(found.most_common())}


def _diff(before: Any, after: Any, path: str, checked: Checked) -> None:
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        for key, value in before.items():
            where = f"{path}.{key}" if path else key
            if key not in after:
                checked.removed.append(where)
            else:
                _diff(value, after[key], where, checked)
        for key in after:
            if key not in before:
                checked.added.append(f"{path}.{key}" if path else key)
    elif isinstance(before, list) and isinstance(after, list) and _by_url(before) is not None:
        # Extensions: matched by URL, named by its last part (extension[us-core-race]).
        mine, theirs = _by_url(before) or {}, _by_url(after) or {}
        for url, value in mine.items():
            where = f"{path}[{url.rsplit('/', 1)[-1]}]"
            if url in theirs:
                _diff(value, theirs[url], where, checked)
            else:
                checked.removed.append(where)
        for url in theirs:
            if url not in mine:
                checked.added.append(f"{path}[{url.rsplit('/', 1)[-1]}]")
    elif isinstance(before, list) and isinstance(after, list):
        for i, value in enumerate(before):
            if i < len(after):
                _diff(value, after[i], f"{path}[{i}]", checked)
            else:
                checked.removed.append(f"{path}[{i}]")
        for i in range(len(before), len(after)):
            checked.added.append(f"{path}[{i}]")
    elif before != after:
        checked.changed.append(path)


def _by_url(items: list[Any]) -> dict[str, Any] | None:
    """A list of extensions by URL (each URL once), or None if it is not one."""
    if not items or not all(isinstance(i, Mapping) and isinstance(i.get("url"), str) for i in items):
        return None
    urls = [i["url"] for i in items]
    return dict(zip(urls, items, strict=True)) if len(set(urls)) == len(urls) else None
