"""De-identification: the form in which a patient's FHIR record may leave the institution.

Theory of operation
-------------------
A *profile* (TOML; ``profiles/default.toml`` unless the node names another) gives each
element of a resource one of seven methods: ``redact`` (remove it), ``keep``,
``generalize`` (a date to its year, an Address to state and country, an Age of 90 or
more to "90 or more"), ``date-shift`` (move it by the patient's offset in days),
``pseudonym`` (a keyed hash in place of an id, reference or identifier), ``scrub``
(free text with identifying patterns replaced by "[REDACTED]") and ``coded-text``
(a CodeableConcept's text, kept only where it repeats one of its codings' displays).

The engine walks the resource's JSON with the R4B model classes as its schema, so the
FHIR type of every element is known wherever it sits. A rule names an element by path
from the resource (``address.line``), by data type anywhere (``<HumanName>``), or by a
data type and a path below it (``<Attachment>.data``). A resource type's section is laid
over the ``"*"`` section, then the most specific rule wins: a path, then a data type with
the longest path below it, then a bare data type (a specialization such as Age also
matches its base, Quantity). ``keep`` on a complex element, like no rule at all, keeps
it and applies the rules to what is inside it; so no rule ever releases something a
more specific rule removes. The default profile redacts ``<string>`` and ``<markdown>``
(free text) and keeps only the strings it names (code displays, units, ...), so an
element nobody thought of is dropped, not released. An element the schema does not
know, or a modifier extension that would be dropped, makes the resource unreleasable.

Extensions are matched by URL first (``[extensions]``): ``keep`` releases the
extension as it is (for coded ones such as US Core race), ``redact`` drops it; others
go through the element rules like any element, and one left with no value is dropped.

One 32-byte institution key drives everything keyed. HMAC-SHA256 under it, with a label
per use, gives pseudonyms shaped like random UUIDs (the same input always gives the
same pseudonym, so ``Encounter/x`` and the Encounter whose id is x still match; a
reference to a provider or place is kept, as is its resource's id) and each patient's
date offset, a nonzero number of days in the profile's range, the same for every
resource of that patient so intervals survive.

A Patient's quasi-identifiers (birth date, gender, address) are written by
:mod:`.kanon` at the k-anonymity level chosen for the patient; level 0 is the profile's
Safe Harbor form. Whatever a removal leaves invalid is repaired the FHIR way: a
required element that had to go is replaced by the data-absent-reason ``masked``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.resources
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

from ..empi.identifiers import resident_id_check_char
from ..errors import DeidentificationError
from .kanon import (
    AGE_GROUP_URL,
    BIRTH_PERIOD_URL,
    OLDEST_AGE,
    SUPPRESSED,
    TOP_LEVEL,
    Hierarchy,
    QuasiIdentifiers,
    Released,
    age_on,
    choose_levels,
    kanon_report,
    quasi_identifiers,
    released_quasi,
    zip3,
)

__all__ = [
    "AGE_GROUP_URL", "BIRTH_PERIOD_URL", "KEY_SIZE", "METHODS", "SUPPRESSED", "TOP_LEVEL", "Deidentifier",
    "Hierarchy", "Profile", "QuasiIdentifiers", "Released", "Rule", "choose_levels", "kanon_report",
    "load_profile", "quasi_identifiers", "released_quasi", "scrub_text", "shift_date", "valid_resident_id",
]

KEY_SIZE = 32
METHODS = ("redact", "keep", "generalize", "date-shift", "pseudonym", "scrub", "coded-text")
#: The element types each transforming method can apply to (redact and keep apply to all).
_APPLIES = {
    "generalize": frozenset({"date", "dateTime", "Address", "Age"}),
    "date-shift": frozenset({"date", "dateTime", "instant"}),
    "pseudonym": frozenset({"Reference", "Identifier", "id", "string", "uri", "oid", "uuid"}),
    "scrub": frozenset({"string", "markdown", "xhtml", "base64Binary"}),
    "coded-text": frozenset({"string"}),
}
#: The Patient elements kanon.py writes, and the methods their rules may use.
_QUASI_RULES = {"birthDate": ("generalize", "redact"), "gender": ("keep", "redact"), "address": ("generalize", "redact")}
_QUASI_KEYS = frozenset({"birthDate", "_birthDate", "gender", "_gender", "address"})
_DAR = {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "masked"}
_MAX_EXTENDS = 4
_TABLES = {
    "profile": {"name", "description", "extends"},
    "date-shift": {"min_days", "max_days"},
    "kanonymity": {"k"},
    "generalize": {"zip3"},
    "references": {"keep", "keep_display"},
    "extensions": None,  # any URL
    "rules": None,  # any section
}
_LABEL_ID = b"ehrnode/deid/pseudonym\x00"
_LABEL_IDENTIFIER = b"ehrnode/deid/identifier\x00"
_LABEL_SHIFT = b"ehrnode/deid/date-shift\x00"


def _unreleasable(message: str) -> DeidentificationError:
    return DeidentificationError(message, reason="unreleasable")


# --- the schema: element types from the R4B model classes ---------------------------

_PRIMITIVES = {
    "String": "string", "Markdown": "markdown", "Code": "code", "Id": "id", "Uri": "uri", "Url": "url",
    "Canonical": "canonical", "Oid": "oid", "Uuid": "uuid", "UuidVersion": "uuid", "Date": "date",
    "DateTime": "dateTime", "Instant": "instant", "Time": "time", "Decimal": "decimal", "Integer": "integer",
    "Integer64": "integer64", "PositiveInt": "positiveInt", "UnsignedInt": "unsignedInt",
    "Base64Binary": "base64Binary", "Xhtml": "xhtml",
}
#: Base classes that end a type's chain of specializations.
_CHAIN_END = frozenset({"Element", "BackboneElement", "DataType", "BackboneType", "Resource", "DomainResource"})
_RESOURCE = get_fhir_model_class("Resource")
_ABSTRACT = frozenset({"Resource", "DomainResource"})


@dataclass(frozen=True, slots=True)
class _Element:
    name: str
    kinds: tuple[str, ...]  # its FHIR type, then the types that type specializes (Age, Quantity)
    model: type | None  # the model class of a complex type
    many: bool
    required: bool
    targets: frozenset[str] = frozenset()  # a Reference's allowed target types

    @property
    def type(self) -> str:
        return self.kinds[0]


def _describe(annotation: Any) -> tuple[str | type, bool]:
    """(primitive type name or model class, is a list) of a model field's annotation."""
    many = False
    while True:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        elif origin is list:
            many, annotation = True, typing.get_args(annotation)[0]
        else:
            break
    if typing.get_origin(annotation) is typing.Annotated:
        for meta in annotation.__metadata__:
            if type(meta).__name__ in _PRIMITIVES:
                return _PRIMITIVES[type(meta).__name__], many
    if annotation is bool:
        return "boolean", many
    if hasattr(annotation, "get_model_klass"):
        return annotation.get_model_klass(), many
    raise TypeError(f"unrecognized field annotation {annotation!r}")


def _kinds(model: type) -> tuple[str, ...]:
    names = []
    for cls in model.__mro__:
        if cls.__name__ in _CHAIN_END or not hasattr(cls, "model_fields"):
            break
        names.append(cls.__name__)
    return tuple(names) or (model.__name__,)


@lru_cache(maxsize=None)
def _elements(model: type) -> dict[str, _Element]:
    """The elements of ``model`` by JSON name."""
    out = {}
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if not extra.get("element_property"):
            continue
        described, many = _describe(info.annotation)
        alias = info.alias or name
        required = info.is_required() or bool(extra.get("element_required"))
        if isinstance(described, str):
            out[alias] = _Element(alias, (described,), None, many, required)
        elif issubclass(described, _RESOURCE):
            out[alias] = _Element(alias, ("Resource",), None, many, required)
        else:
            targets = frozenset(extra.get("enum_reference_types") or ())
            out[alias] = _Element(alias, _kinds(described), described, many, required, targets)
    return out


@lru_cache(maxsize=None)
def _required(model: type) -> tuple[_Element, ...]:
    return tuple(e for e in _elements(model).values() if e.required)


@lru_cache(maxsize=None)
def _resource_model(rtype: str) -> type | None:
    if not re.fullmatch(r"[A-Z][A-Za-z]+", rtype) or rtype in _ABSTRACT:
        return None
    try:
        model = get_fhir_model_class(rtype)
    except (ValueError, ImportError):
        return None
    return model if issubclass(model, _RESOURCE) and model.__name__ == rtype else None


@lru_cache(maxsize=None)
def _datatype_model(name: str) -> type | None:
    try:
        model = get_fhir_model_class(name)
    except (ValueError, ImportError):
        return None
    return None if issubclass(model, _RESOURCE) or model.__name__ != name else model


_PRIMITIVE_EXTENSION = get_fhir_model_class("FHIRPrimitiveExtension")
_DOMAIN_RESOURCE = get_fhir_model_class("DomainResource")


# --- rules ----------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*")


@dataclass(frozen=True)
class Rule:
    """One line of a profile: ``key = "method"`` in ``[rules."section"]``."""

    method: str
    section: str
    key: str

    def __str__(self) -> str:
        return f'[rules."{self.section}"] "{self.key}" = "{self.method}"'


def _parse_key(key: str) -> tuple[str | None, tuple[str, ...]] | None:
    """(anchor data type or None, element names) of a rule key, or None if malformed."""
    anchor = None
    rest = key
    if key.startswith("<"):
        end = key.find(">")
        if end < 0 or not _NAME.fullmatch(key[1:end]):
            return None
        anchor, rest = key[1:end], key[end + 1:]
        if rest and not rest.startswith("."):
            return None
        rest = rest[1:]
        if not rest:
            return anchor, ()
    names = tuple(rest.split("."))
    if not all(_NAME.fullmatch(n) for n in names):
        return None
    return anchor, names


class _RuleSet:
    """The rules in force for one resource type, indexed for the most-specific-first lookup."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.paths: dict[tuple[str, ...], Rule] = {}
        self.anchored: dict[tuple[str, ...], dict[str, Rule]] = {}
        self.types: dict[str, Rule] = {}
        for rule in rules:
            parsed = _parse_key(rule.key)
            assert parsed is not None  # keys are checked when the profile loads
            anchor, names = parsed
            if anchor is None:
                self.paths[names] = rule
            elif names:
                self.anchored.setdefault(names, {})[anchor] = rule
            else:
                self.types[anchor] = rule
        self.longest = max((len(n) for n in self.anchored), default=0)
        self._plans: dict[tuple[str, ...], dict[str, _Step]] = {}

    def plan(self, model: type, path: tuple[str, ...], chain: tuple[tuple[str, ...], ...]) -> dict[str, _Step]:
        """Each child element of the element at ``path`` (of type ``model``) with its method.

        Within one resource type the path fixes the type, so this is computed once per path.
        """
        found = self._plans.get(path)
        if found is None:
            found = {}
            for name, element in _elements(model).items():
                epath, echain = path + (name,), chain + (element.kinds,)
                rule = self.find(epath, echain)
                found[name] = _Step(element, rule.method if rule else None, epath, echain)
            self._plans[path] = found
        return found

    def find(self, path: tuple[str, ...], chain: tuple[tuple[str, ...], ...]) -> Rule | None:
        """The rule for the element at ``path``; ``chain`` holds the kinds of each step."""
        rule = self.paths.get(path)
        if rule is None:
            for size in range(min(self.longest, len(path) - 1), 0, -1):
                by_anchor = self.anchored.get(path[-size:])
                if by_anchor:
                    rule = next((by_anchor[k] for k in chain[-size - 1] if k in by_anchor), None)
                    if rule is not None:
                        break
        if rule is None:
            rule = next((self.types[k] for k in chain[-1] if k in self.types), None)
        return rule


@dataclass(frozen=True, slots=True)
class _Step:
    element: _Element
    method: str | None
    path: tuple[str, ...]
    chain: tuple[tuple[str, ...], ...]


# --- profiles ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """A loaded, checked de-identification profile (see ``docs/deidentification.md``)."""

    name: str
    source: str
    rules: Mapping[str, Mapping[str, Rule]]
    extensions: Mapping[str, str]
    directory: frozenset[str]
    directory_display: bool
    shift_min_days: int
    shift_max_days: int
    k: int
    zip3: bool
    _rulesets: dict[str, _RuleSet] = field(default_factory=dict, repr=False, compare=False)

    def ruleset(self, rtype: str) -> _RuleSet:
        """The ``"*"`` rules with ``rtype``'s own laid over them."""
        found = self._rulesets.get(rtype)
        if found is None:
            merged = {**self.rules.get("*", {}), **self.rules.get(rtype, {})}
            found = self._rulesets[rtype] = _RuleSet(merged.values())
        return found

    def quasi_method(self, name: str) -> str | None:
        """The method the rules give Patient.``name`` (birthDate, gender, address)."""
        element = _elements(_resource_model("Patient"))[name]
        rule = self.ruleset("Patient").find((name,), (element.kinds,))
        return rule.method if rule else None

    def hierarchy(self, today: date) -> Hierarchy:
        return Hierarchy(
            today=today, birth=self.quasi_method("birthDate") == "generalize",
            gender=self.quasi_method("gender") != "redact", region=self.quasi_method("address") == "generalize",
            zip3=self.zip3,
        )


def _packaged_default() -> tuple[str, str]:
    resource = importlib.resources.files(__package__) / "profiles" / "default.toml"
    return "default profile", resource.read_text(encoding="utf-8")


def load_profile(path: Path | str | None = None) -> Profile:
    """Load and check a profile; None loads the packaged default.

    Raises DeidentificationError (reason ``bad_profile``) naming the file and the rule
    or setting at fault: unreadable file, bad TOML, unknown table, key, method, resource
    type, element or data type, a method that cannot apply to its element's type.
    """
    if path is None:
        source, text = _packaged_default()
        base = None
    else:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DeidentificationError(f"{source}: cannot read the profile: {exc}", reason="bad_profile") from exc
        base = path.parent
    data = _with_extends(_parse_toml(text, source), source, base, 0)
    return _build(data, source)


def _fail(source: str, where: str, problem: str) -> DeidentificationError:
    return DeidentificationError(f"{source}: {where}: {problem}", reason="bad_profile")


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _fail(source, "TOML", str(exc)) from exc


def _with_extends(data: dict[str, Any], source: str, base: Path | None, depth: int) -> dict[str, Any]:
    """``data`` laid over the profile its ``[profile] extends`` names, if any."""
    header = data.get("profile")
    parent_name = header.get("extends") if isinstance(header, dict) else None
    if parent_name is None:
        return data
    if not isinstance(parent_name, str) or depth >= _MAX_EXTENDS:
        raise _fail(source, "[profile] extends", "must name \"default\" or a profile file (at most 4 deep)")
    if parent_name == "default":
        parent_source, text = _packaged_default()
        parent_base = None
    else:
        parent_path = (base or Path.cwd()) / parent_name
        parent_source = str(parent_path)
        try:
            text = parent_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise _fail(source, "[profile] extends", f"cannot read {parent_path}: {exc}") from exc
        parent_base = parent_path.parent
    parent = _with_extends(_parse_toml(text, parent_source), parent_source, parent_base, depth + 1)
    merged = _merge(parent, data)
    merged["profile"].pop("extends", None)
    return merged


def _merge(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(under)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _build(data: dict[str, Any], source: str) -> Profile:
    for table, value in data.items():
        if table not in _TABLES:
            raise _fail(source, f"[{table}]", f"unknown table (expected one of {', '.join(_TABLES)})")
        if not isinstance(value, dict):
            raise _fail(source, f"[{table}]", "must be a table")
        allowed = _TABLES[table]
        for key in value:
            if allowed is not None and key not in allowed:
                raise _fail(source, f"[{table}] {key}", f"unknown key (expected one of {', '.join(sorted(allowed))})")

    header = data.get("profile", {})
    name = header.get("name")
    if not isinstance(name, str) or not name:
        raise _fail(source, "[profile] name", "missing or not a string")

    shift = data.get("date-shift")
    if shift is None:
        raise _fail(source, "[date-shift]", "missing (min_days and max_days)")
    low, high = shift.get("min_days"), shift.get("max_days")
    if not all(isinstance(v, int) and not isinstance(v, bool) and -3650 <= v <= 3650 for v in (low, high)):
        raise _fail(source, "[date-shift]", "min_days and max_days must be integers in -3650..3650")
    if low > high or low == high == 0:
        raise _fail(source, "[date-shift]", "min_days must not exceed max_days, and the range must hold a nonzero day")

    k = data.get("kanonymity", {}).get("k", 1)
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 1000:
        raise _fail(source, "[kanonymity] k", "must be an integer in 0..1000 (0 and 1 mean off)")
    keep_zip3 = data.get("generalize", {}).get("zip3", True)
    if not isinstance(keep_zip3, bool):
        raise _fail(source, "[generalize] zip3", "must be true or false")

    references = data.get("references", {})
    directory = references.get("keep", [])
    if not isinstance(directory, list) or not all(isinstance(t, str) and _resource_model(t) for t in directory):
        raise _fail(source, "[references] keep", "must be a list of FHIR resource types")
    keep_display = references.get("keep_display", False)
    if not isinstance(keep_display, bool):
        raise _fail(source, "[references] keep_display", "must be true or false")

    extensions = {}
    for url, method in data.get("extensions", {}).items():
        if ":" not in url:
            raise _fail(source, f'[extensions] "{url}"', "is not an extension URL")
        if method not in ("keep", "redact"):
            raise _fail(source, f'[extensions] "{url}"', f"unknown method {method!r} (extensions take keep or redact)")
        extensions[url] = method

    rules: dict[str, dict[str, Rule]] = {}
    sections = data.get("rules")
    if not sections:
        raise _fail(source, "[rules]", "missing: a profile needs at least a [rules.\"*\"] section")
    for section, entries in sections.items():
        if not isinstance(entries, dict):
            raise _fail(source, f'[rules."{section}"]', "must be a table of element = method")
        model = _DOMAIN_RESOURCE if section == "*" else _resource_model(section)
        if model is None:
            raise _fail(source, f'[rules."{section}"]', "not a FHIR resource type (or \"*\")")
        rules[section] = {}
        for key, method in entries.items():
            rule = Rule(method, section, key) if isinstance(method, str) else Rule(repr(method), section, key)
            _check_rule(source, rule, model)
            rules[section][key] = rule

    profile = Profile(
        name=name, source=source, rules=rules, extensions=extensions, directory=frozenset(directory),
        directory_display=keep_display, shift_min_days=low, shift_max_days=high, k=k, zip3=keep_zip3,
    )
    for element, allowed in _QUASI_RULES.items():
        method = profile.quasi_method(element)
        if method not in allowed and not (element == "gender" and method is None):
            rule = profile.ruleset("Patient").find((element,), (_elements(_resource_model("Patient"))[element].kinds,))
            where = str(rule) if rule else f"Patient.{element}"
            raise _fail(source, where, f"Patient.{element} is a quasi-identifier: its rule must be "
                                       f"{' or '.join(allowed)} (k-anonymity depends on it)")
    return profile


def _check_rule(source: str, rule: Rule, resource_model: type) -> None:
    """Raise unless ``rule`` names a real element and its method can apply to it."""
    where = str(rule)
    if rule.method not in METHODS:
        raise _fail(source, where, f"unknown method (expected one of {', '.join(METHODS)})")
    parsed = _parse_key(rule.key)
    if parsed is None:
        raise _fail(source, where, 'not an element path ("a.b"), a data type ("<Type>") or both ("<Type>.a.b")')
    anchor, names = parsed
    if anchor is not None:
        model = _datatype_model(anchor)
        if model is None and anchor not in _PRIMITIVES.values() and anchor != "boolean":
            raise _fail(source, where, f"{anchor} is not a FHIR data type")
        if model is None and names:
            raise _fail(source, where, f"{anchor} is a primitive type and has no elements")
        kind, parent = (anchor, None) if not names else (None, anchor)
    else:
        model, kind, parent = resource_model, None, None
    for position, step in enumerate(names):
        if model is None:
            raise _fail(source, where, f"{names[position - 1]} has no elements")
        element = _elements(model).get(step)
        if element is None:
            owner = "every resource" if rule.section == "*" and anchor is None else model.__name__
            raise _fail(source, where, f"{owner} has no element {step!r}")
        if element.type == "Resource":
            raise _fail(source, where, "rules do not reach into nested resources; give their own type a section")
        parent, kind, model = (model.__name__ if position else (anchor or rule.section)), element.type, element.model
    applies = _APPLIES.get(rule.method)
    if applies is not None and kind not in applies:
        raise _fail(source, where, f"{rule.method} cannot apply to {kind} (it applies to {', '.join(sorted(applies))})")
    if rule.method == "coded-text" and (parent != "CodeableConcept" or names[-1:] != ("text",)):
        raise _fail(source, where, "coded-text applies only to a CodeableConcept's text")


# --- dates ------------------------------------------------------------------------------

_DATE_FORM = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})?)?)?)?")


def shift_date(value: str, days: int) -> str:
    """``value`` (FHIR date, dateTime or instant) moved by ``days``, in the same form.

    The time of day and the zone offset are kept as written, so every interval within
    one patient's record is exactly preserved. A year or a year-month names a period;
    its middle is shifted and the result cut back to the same precision.
    """
    m = _DATE_FORM.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"{value!r} is not a FHIR date")
    year, month, day, time = m.groups()
    try:
        if day:
            return (date(int(year), int(month), int(day)) + timedelta(days=days)).isoformat() + (time or "")
        middle = date(int(year), int(month or 7), 15 if month else 2) + timedelta(days=days)
    except OverflowError as exc:
        raise ValueError(f"{value!r} shifted by {days} days is out of range") from exc
    return f"{middle.year:04d}-{middle.month:02d}" if month else f"{middle.year:04d}"


# --- free text ----------------------------------------------------------------------------

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
    return _SCRUB.sub(REDACTED, text)


def _scrub_markup(text: str) -> str:
    """Scrub the text between tags only, so the markup and namespaces stay intact."""
    return "".join(part if part.startswith("<") else scrub_text(part) for part in _TAG.split(text))


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


# --- references ---------------------------------------------------------------------------

_LITERAL_REF = re.compile(r"(?:.*/)?([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?")
_CONDITIONAL_REF = re.compile(r"([A-Z][A-Za-z]+)\?.*", re.DOTALL)


def _reference_target(reference: Any, kind: Any) -> str | None:
    """The resource type a Reference points to, if it can be told."""
    if isinstance(reference, str):
        m = _LITERAL_REF.fullmatch(reference) or _CONDITIONAL_REF.fullmatch(reference)
        if m:
            return m.group(1)
    if isinstance(kind, str):
        return kind.rsplit("/", 1)[-1]
    return None


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


# --- the engine -------------------------------------------------------------------------

_DROP: Any = object()
_AGE_UNITS_PER_YEAR = {"a": 1.0, "mo": 12.0, "wk": 52.1775, "d": 365.25, "h": 8766.0, "min": 525960.0}
_TEXT_TYPES = ("text/", "application/json", "application/fhir+json", "application/xml", "application/fhir+xml",
               "application/xhtml+xml")


class Deidentifier:
    """Applies one profile under one institution key; stateless between calls.

    ``today`` fixes the date ages are computed on (90 and over); by default, the day of
    each call.
    """

    def __init__(self, profile: Profile, key: bytes, *, today: date | None = None) -> None:
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_SIZE:
            raise DeidentificationError(f"the de-identification key must be {KEY_SIZE} bytes", reason="bad_key")
        self.profile = profile
        self._mac = hmac.new(bytes(key), digestmod=hashlib.sha256)
        self._today = today

    @property
    def today(self) -> date:
        return self._today or date.today()

    @property
    def hierarchy(self) -> Hierarchy:
        return self.profile.hierarchy(self.today)

    # --- keyed values

    def _digest(self, label: bytes, value: str) -> bytes:
        mac = self._mac.copy()
        mac.update(label + value.encode("utf-8"))
        return mac.digest()

    @staticmethod
    def _uuid(digest: bytes) -> str:
        # Version 4 and variant bits, so the pseudonym also validates where FHIR wants a uuid.
        b = bytearray(digest[:16])
        b[6] = b[6] & 0x0F | 0x40
        b[8] = b[8] & 0x3F | 0x80
        h = b.hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def pseudonym(self, value: str) -> str:
        """The pseudonym of a resource id (or any string): a UUID-shaped keyed hash."""
        return self._uuid(self._digest(_LABEL_ID, value))

    def resource_id(self, resource_type: str, value: str) -> str:
        """The released id of a resource: kept for providers and places, else a pseudonym."""
        return value if resource_type in self.profile.directory else self.pseudonym(value)

    def reference(self, text: str) -> str:
        """A Reference.reference as released; lines up with :meth:`resource_id`."""
        if text.startswith("#"):
            return text  # a contained resource, local to this one
        m = _LITERAL_REF.fullmatch(text)
        if m:
            rtype, rid = m.groups()
            return text if rtype in self.profile.directory else f"{rtype}/{self.pseudonym(rid)}"
        if text.startswith("urn:uuid:"):
            return "urn:uuid:" + self.pseudonym(text[len("urn:uuid:"):])
        m = _CONDITIONAL_REF.fullmatch(text)
        if m:
            # A search cannot be resolved here; the whole query gets one stable pseudonym.
            return text if m.group(1) in self.profile.directory else f"{m.group(1)}/{self.pseudonym(text)}"
        return "urn:uuid:" + self.pseudonym(text)

    def identifier_value(self, system: str | None, value: str) -> str:
        """The pseudonym of an Identifier's value within its system."""
        pseudonym = self._uuid(self._digest(_LABEL_IDENTIFIER, f"{system or ''}|{value}"))
        uri = system == "urn:ietf:rfc:3986" or value.startswith(("urn:uuid:", "urn:oid:"))
        return "urn:uuid:" + pseudonym if uri else pseudonym

    def date_shift_days(self, patient: str) -> int:
        """The patient's date offset: the same for every call, nonzero, within the profile's range."""
        if not isinstance(patient, str) or not patient:
            raise DeidentificationError("a date shift needs the patient's id", reason="no_patient")
        low, high = self.profile.shift_min_days, self.profile.shift_max_days
        zero_inside = low <= 0 <= high
        choices = high - low + 1 - zero_inside
        days = low + int.from_bytes(self._digest(_LABEL_SHIFT, patient)[:8], "big") % choices
        return days + 1 if zero_inside and days >= 0 else days

    # --- the public calls

    def deidentify(self, resource: Mapping[str, Any], *, patient: str, level: int = 0) -> dict[str, Any]:
        """The released form of ``resource`` (a new dict; the input is not changed).

        ``patient`` is the local id of the Patient the resource belongs to (a Patient's
        own id); ``level`` the k-anonymity level of that patient (0 to SUPPRESSED), used
        for a Patient's quasi-identifiers. Raises DeidentificationError (``unreleasable``)
        for a resource the schema does not know, a Bundle (release its entries one by one),
        a date that cannot be shifted, or a modifier extension that would be dropped.
        """
        if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= SUPPRESSED:
            raise DeidentificationError(f"k-anonymity level {level!r} is not in 0..{SUPPRESSED}", reason="bad_level")
        if not isinstance(resource, Mapping):
            raise _unreleasable("a resource must be a JSON object")
        return _Pass(self, patient, level).resource(resource, nested=False)

    def choose_levels(self, population: Mapping[str, QuasiIdentifiers], k: int | None = None, *,
                      released: Mapping[str, Iterable[str | None]] | None = None) -> dict[str, int]:
        """:func:`.kanon.choose_levels` with this profile's hierarchy and k (unless given)."""
        return choose_levels(population, self.profile.k if k is None else k, hierarchy=self.hierarchy,
                             released=released)


@dataclass(frozen=True, slots=True)
class _Frame:
    """The resource being walked: its type, its rules, and whether it sits inside another."""

    rtype: str
    rules: _RuleSet
    nested: bool


class _Pass:
    """One call of :meth:`Deidentifier.deidentify`: the patient, its offset, its level."""

    def __init__(self, deid: Deidentifier, patient: str, level: int) -> None:
        self.deid = deid
        self.profile = deid.profile
        self.patient = patient
        self.level = level
        self._offset: int | None = None

    @property
    def offset(self) -> int:
        if self._offset is None:
            self._offset = self.deid.date_shift_days(self.patient)
        return self._offset

    def resource(self, node: Mapping[str, Any], *, nested: bool) -> dict[str, Any]:
        rtype = node.get("resourceType")
        model = _resource_model(rtype) if isinstance(rtype, str) else None
        if model is None:
            raise _unreleasable(f"unknown resource type {rtype!r}")
        if rtype == "Bundle":
            raise _unreleasable("a Bundle is not released as one; de-identify its entries one by one")
        frame = _Frame(rtype, self.profile.ruleset(rtype), nested)
        skip = _QUASI_KEYS if rtype == "Patient" else frozenset()
        out: dict[str, Any] = {"resourceType": rtype}
        out.update(self.walk(node, model, frame, (), (), skip))
        if rtype == "Patient":
            released = self.deid.hierarchy.elements(quasi_identifiers(node), self.level)
            extensions = released.pop("extension", [])
            out.update(released)
            if extensions:
                out["extension"] = out.get("extension", []) + extensions
        self._require(model, node, out)
        return out

    def walk(self, node: Mapping[str, Any], model: type, frame: _Frame, path: tuple[str, ...],
             chain: tuple[tuple[str, ...], ...], skip: frozenset[str] = frozenset()) -> dict[str, Any]:
        """The released children of ``node`` (an element or resource of type ``model``)."""
        if not isinstance(node, Mapping):
            raise _unreleasable(f"{frame.rtype}.{'.'.join(path)}: expected a JSON object")
        plan = frame.rules.plan(model, path, chain)
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in skip or (key == "resourceType" and not path):
                continue
            companion_only = key.startswith("_")
            name = key[1:] if companion_only else key
            if companion_only and name in node:
                continue  # handled with its value
            step = plan.get(name)
            if step is None:
                raise _unreleasable(f"{frame.rtype}: unknown element {'.'.join(path + (name,))!r}")
            element, method, epath, echain = step.element, step.method, step.path, step.chain
            if method == "redact" and element.type != "Extension":  # an extension's URL rule comes first
                result = _DROP
            elif companion_only:
                result = self._companion(value, frame, epath, echain)
            else:
                result = self._value(element, value, node, method, frame, epath, echain)
            if name == "modifierExtension" and (result is _DROP or len(result) < len(value)):
                raise _unreleasable(f"{frame.rtype}: a modifier extension at {'.'.join(path) or 'the root'} "
                                    "would be removed, which changes the meaning of what is left")
            if result is _DROP:
                continue
            out[key] = result
            companion = None if companion_only else node.get("_" + key)
            if companion is not None:
                extra = self._companion(companion, frame, epath, echain)
                if extra is not _DROP:
                    out["_" + key] = extra
        return out

    def _value(self, element: _Element, value: Any, parent: Mapping[str, Any], method: str | None,
               frame: _Frame, path: tuple[str, ...], chain: tuple[tuple[str, ...], ...]) -> Any:
        if element.many:
            if not isinstance(value, list):
                raise _unreleasable(f"{frame.rtype}.{'.'.join(path)}: expected a list")
            if element.model is None and element.type != "Resource":
                items = [None if v is None else self._primitive(element, v, parent, method, frame, path) for v in value]
            else:
                items = [self._complex(element, v, method, frame, path, chain) for v in value]
            items = [v for v in items if v is not _DROP]
            return items if any(v is not None for v in items) else _DROP
        if element.model is None and element.type != "Resource":
            return self._primitive(element, value, parent, method, frame, path)
        return self._complex(element, value, method, frame, path, chain)

    def _complex(self, element: _Element, value: Any, method: str | None, frame: _Frame,
                 path: tuple[str, ...], chain: tuple[tuple[str, ...], ...]) -> Any:
        if not isinstance(value, Mapping):
            raise _unreleasable(f"{frame.rtype}.{'.'.join(path)}: expected a JSON object")
        kind = element.type
        if kind == "Resource":
            return self.resource(value, nested=True)
        if kind == "Extension":
            by_url = self.profile.extensions.get(value.get("url"))
            if by_url == "keep":
                return _copy(dict(value))
            if by_url == "redact" or method == "redact":
                return _DROP
        if method == "generalize":
            return self._generalized_address(value) if kind == "Address" else self._generalized_age(value)
        if method == "pseudonym" and kind == "Reference":
            return self._reference(value, element.targets)
        out = self._walked(element, value, frame, path, chain)
        if method == "pseudonym" and kind == "Identifier" and isinstance(value.get("value"), str):
            if out is _DROP:
                out = {}
            out["value"] = self.deid.identifier_value(value.get("system"), value["value"])
            out.pop("_value", None)
        return out

    def _walked(self, element: _Element, value: Mapping[str, Any], frame: _Frame, path: tuple[str, ...],
                chain: tuple[tuple[str, ...], ...]) -> Any:
        assert element.model is not None
        out = self.walk(value, element.model, frame, path, chain)
        if element.type == "Extension" and not any(k.startswith(("value", "_value")) or k == "extension" for k in out):
            return _DROP
        if element.type == "Attachment":
            _fix_attachment(value, out)
        if not any(k != "id" for k in out):
            return _DROP
        self._require(element.model, value, out)
        return out

    def _primitive(self, element: _Element, value: Any, parent: Mapping[str, Any], method: str | None,
                   frame: _Frame, path: tuple[str, ...]) -> Any:
        if method is None or method == "keep":
            return value
        where = f"{frame.rtype}.{'.'.join(path)}"
        if not isinstance(value, str):
            raise _unreleasable(f"{where}: {method} needs a string, got {type(value).__name__}")
        if method == "date-shift":
            try:
                return shift_date(value, self.offset)
            except ValueError as exc:
                raise _unreleasable(f"{where}: {exc}") from exc
        if method == "generalize":
            m = _DATE_FORM.fullmatch(value)
            if m is None:
                raise _unreleasable(f"{where}: {value!r} is not a FHIR date")
            if path[-1] == "birthDate":
                age = age_on(value, self.deid.today)
                if age is not None and age >= OLDEST_AGE:
                    return _DROP  # any year would reveal an age over 89
            return m.group(1)
        if method == "pseudonym":
            return self._pseudonym(element.type, value, frame, path)
        if method == "scrub":
            if element.type == "xhtml":
                return _scrub_markup(value)
            if element.type == "base64Binary":
                return _scrub_base64(value, parent)
            return scrub_text(value)
        if method == "coded-text":
            codings = parent.get("coding") if isinstance(parent, Mapping) else None
            displays = {c["display"].strip().casefold() for c in codings or ()
                        if isinstance(c, Mapping) and isinstance(c.get("display"), str)}
            return value if value.strip().casefold() in displays else _DROP
        raise _unreleasable(f"{where}: {method} cannot apply to {element.type}")

    def _pseudonym(self, kind: str, value: str, frame: _Frame, path: tuple[str, ...]) -> str:
        if path == ("id",):
            # A contained resource's id is only an anchor for "#id" references inside its container.
            return value if frame.nested else self.deid.resource_id(frame.rtype, value)
        if kind == "uri":
            return self.deid.reference(value)
        if kind == "oid":
            # The 2.25 arc holds OIDs made from UUIDs, so the pseudonym is still a valid oid.
            return "urn:oid:2.25." + str(int(self.deid.pseudonym(value).replace("-", ""), 16))
        if kind == "uuid":
            return "urn:uuid:" + self.deid.pseudonym(value)
        return self.deid.pseudonym(value)

    def _companion(self, value: Any, frame: _Frame, path: tuple[str, ...],
                   chain: tuple[tuple[str, ...], ...]) -> Any:
        """A primitive's ``_name`` sibling (its id and extensions), walked like an element."""
        if isinstance(value, list):
            items = [None if v is None else self._companion(v, frame, path, chain) for v in value]
            items = [None if v is _DROP else v for v in items]
            return items if any(v is not None for v in items) else _DROP
        out = self.walk(value, _PRIMITIVE_EXTENSION, frame, path, chain)
        return out if "extension" in out else _DROP

    def _reference(self, ref: Mapping[str, Any], targets: frozenset[str]) -> Any:
        text, kind = ref.get("reference"), ref.get("type")
        target = _reference_target(text, kind)
        # Without a type in the reference, the element's definition may still say that it
        # can only point to providers or places.
        directory = self.profile.directory
        if target in directory or (target is None and targets and targets <= directory):
            keep = ("reference", "type", "identifier") + (("display",) if self.profile.directory_display else ())
            out = {k: _copy(ref[k]) for k in keep if k in ref}
            return out or _DROP
        # Anything else may be the patient, a relative or the patient's own record: only
        # the pseudonymous link survives, never a display (it holds names).
        out = {}
        if isinstance(text, str):
            out["reference"] = self.deid.reference(text)
        if isinstance(kind, str):
            out["type"] = kind
        identifier = ref.get("identifier")
        if isinstance(identifier, Mapping) and isinstance(identifier.get("value"), str):
            out["identifier"] = {k: identifier[k] for k in ("use", "system") if isinstance(identifier.get(k), str)}
            out["identifier"]["value"] = self.deid.identifier_value(identifier.get("system"), identifier["value"])
        return out or _DROP

    def _generalized_address(self, address: Mapping[str, Any]) -> Any:
        country, state = address.get("country"), address.get("state")
        out = {}
        if isinstance(country, str):
            out["country"] = country
        if isinstance(state, str):
            out["state"] = state
        postal = address.get("postalCode")
        short = zip3(postal, country if isinstance(country, str) else None) if isinstance(postal, str) else None
        if self.profile.zip3 and short is not None:
            out["postalCode"] = short
        return out or _DROP

    @staticmethod
    def _generalized_age(age: Mapping[str, Any]) -> Any:
        out = {k: age[k] for k in ("value", "comparator", "unit", "system", "code") if k in age}
        value, unit = age.get("value"), age.get("code") or age.get("unit")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            years = value / _AGE_UNITS_PER_YEAR.get(unit, 1.0)
            if years >= OLDEST_AGE:
                return {"value": OLDEST_AGE, "comparator": ">=", "unit": "a", "system": "http://unitsofmeasure.org",
                        "code": "a"}
        return out or _DROP

    @staticmethod
    def _require(model: type, before: Mapping[str, Any], after: dict[str, Any]) -> None:
        """Mark each required element that was present and had to go as masked (data-absent-reason)."""
        for element in _required(model):
            name = element.name
            if name in after or "_" + name in after:
                continue
            if name not in before and "_" + name not in before:
                continue
            if element.model is not None:
                after[name] = [{"extension": [dict(_DAR)]}] if element.many else {"extension": [dict(_DAR)]}
            elif not element.many:
                after["_" + name] = {"extension": [dict(_DAR)]}


def _fix_attachment(before: Mapping[str, Any], after: dict[str, Any]) -> None:
    """An Attachment's size and hash describe its data: recompute them or drop them with it."""
    data = after.get("data")
    if data is None:
        for key in ("size", "_size", "hash", "_hash"):
            after.pop(key, None)
    elif data != before.get("data"):
        raw = base64.b64decode(data)
        after["size"] = len(raw)
        after["hash"] = base64.b64encode(hashlib.sha1(raw).digest()).decode("ascii")
        after.pop("_size", None)
        after.pop("_hash", None)


def _scrub_base64(value: str, attachment: Mapping[str, Any]) -> Any:
    """Decode a text attachment, scrub it and encode it again; anything else is dropped."""
    content_type = attachment.get("contentType") if isinstance(attachment, Mapping) else None
    if not isinstance(content_type, str):
        return _DROP
    mime, _, params = content_type.partition(";")
    mime = mime.strip().lower()
    if not mime.startswith(_TEXT_TYPES):
        return _DROP  # images, PDFs: nothing can be scrubbed, so nothing is released
    m = re.search(r"charset\s*=\s*\"?([A-Za-z0-9._-]+)", params)
    charset = m.group(1) if m else "utf-8"
    try:
        text = base64.b64decode(value, validate=True).decode(charset)
        scrubbed = _scrub_markup(text) if ("html" in mime or "xml" in mime) else scrub_text(text)
        return base64.b64encode(scrubbed.encode(charset)).decode("ascii")
    except (ValueError, LookupError, UnicodeError):
        return _DROP
