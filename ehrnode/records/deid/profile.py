"""De-identification profiles: loading and checking the TOML, and finding each element's rule.

A profile gives each element of a resource one of the methods in ``METHODS``; see the package's
docstring for what each does, and ``docs/deidentification.md`` for the file format.
"""

from __future__ import annotations

import importlib.resources
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from functools import cached_property
from pathlib import Path
from typing import Any

from ...errors import DeidentificationError
from ..kanon import BIRTH_SEX_URL, GENDER_IDENTITY_URL, Hierarchy
from .schema import DOMAIN_RESOURCE, PRIMITIVES, Element, datatype_model, elements, resource_model

METHODS = ("redact", "keep", "generalize", "date-shift", "pseudonym", "scrub", "coded-text", "coded")
#: The element types each transforming method can apply to (redact and keep apply to all).
_APPLIES = {
    "generalize": frozenset({"date", "dateTime", "Address", "Age"}),
    "date-shift": frozenset({"date", "dateTime", "instant"}),
    "pseudonym": frozenset({"Reference", "Identifier", "id", "string", "uri", "oid", "uuid"}),
    "scrub": frozenset({"string", "markdown", "xhtml", "base64Binary"}),
    "coded-text": frozenset({"string"}),
    # Allow-listed vocabulary: a Coding or Quantity of a known terminology is kept, another is
    # pseudonymized (Coding) or reduced to its number (Quantity); a uri or canonical is kept
    # only under a known prefix.
    "coded": frozenset({"Coding", "Quantity", "uri", "canonical", "url"}),
}
#: The Patient elements kanon.py writes, and the methods their rules may use.
_QUASI_RULES = {"birthDate": ("generalize", "redact"), "gender": ("keep", "redact"),
                "address": ("generalize", "redact"), "deceasedDateTime": ("generalize", "redact")}
_MAX_EXTENDS = 4
_TABLES = {
    "profile": {"name", "description", "extends"},
    "date-shift": {"min_days", "max_days"},
    "kanonymity": {"k"},
    "generalize": {"zip3"},
    "references": {"keep", "keep_display"},
    "terminologies": {"systems"},
    "extensions": None,  # any URL
    "rules": None,  # any section
}

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


class RuleSet:
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
        self._plans: dict[tuple[str, ...], dict[str, Step]] = {}

    def plan(self, model: type, path: tuple[str, ...], chain: tuple[tuple[str, ...], ...]) -> dict[str, Step]:
        """Each child element of the element at ``path`` (of type ``model``) with its method.

        Within one resource type the path fixes the type, so this is computed once per path.
        """
        found = self._plans.get(path)
        if found is None:
            found = {}
            for name, element in elements(model).items():
                epath, echain = path + (name,), chain + (element.kinds,)
                rule = self.find(epath, echain)
                found[name] = Step(element, rule.method if rule else None, epath, echain)
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
class Step:
    element: Element
    method: str | None
    path: tuple[str, ...]
    chain: tuple[tuple[str, ...], ...]



#: Elements of a provider or place that, contained in a patient's resource, identify the
#: patient beyond what the ``"*"`` rules remove: a Location's coordinates are a geolocation.
_CONTAINED = {"Location": {"position": Rule("redact", "Location", "position")}}


@dataclass(frozen=True)
class ExtensionRule:
    """What ``[extensions]`` allows of one extension URL.

    ``keep``: released, its value walked by the element rules like any element (so a string
    goes, a Coding of a known terminology stays). ``sub``: the sub-extensions (by their
    relative URL) released likewise; any other is dropped. ``codes``: the only values its
    ``valueCode`` may take (another drops the extension).
    """

    keep: bool
    sub: frozenset[str] = frozenset()
    codes: frozenset[str] | None = None


@dataclass(frozen=True)
class Profile:
    """A loaded, checked de-identification profile (see ``docs/deidentification.md``)."""

    name: str
    source: str
    rules: Mapping[str, Mapping[str, Rule]]
    extensions: Mapping[str, ExtensionRule]
    directory: frozenset[str]
    directory_display: bool
    shift_min_days: int
    shift_max_days: int
    k: int
    zip3: bool
    #: Code systems and canonical prefixes whose codes and displays are released (an entry
    #: ending in "/" is a prefix).
    terminologies: frozenset[str] = frozenset()
    _rulesets: dict[tuple[str, bool], RuleSet] = field(default_factory=dict, repr=False, compare=False)

    def ruleset(self, rtype: str, *, contained: bool = False) -> RuleSet:
        """The ``"*"`` rules with ``rtype``'s own laid over them. A provider or place
        contained in a patient's resource is patient data (a home-health Location is the
        patient's home): its directory section does not apply there."""
        contained = contained and rtype in self.directory
        found = self._rulesets.get((rtype, contained))
        if found is None:
            own = dict(_CONTAINED.get(rtype, {})) if contained else self.rules.get(rtype, {})
            merged = {**self.rules.get("*", {}), **own}
            found = self._rulesets[(rtype, contained)] = RuleSet(merged.values())
        return found

    def known(self, system: object) -> bool:
        """Whether ``system`` (a code system or canonical URL) is a known terminology."""
        if not isinstance(system, str) or not system:
            return False
        return system in self.terminologies or system.startswith(self._prefixes)

    @cached_property
    def _prefixes(self) -> tuple[str, ...]:
        return tuple(t for t in self.terminologies if t.endswith("/"))

    def extension(self, url: object) -> ExtensionRule | None:
        """The rule for an extension URL; None when it is not allow-listed (it is dropped)."""
        rule = self.extensions.get(url) if isinstance(url, str) else None
        return rule if rule is not None and rule.keep else None

    def quasi_method(self, name: str) -> str | None:
        """The method the rules give Patient.``name`` (birthDate, gender, address)."""
        element = elements(resource_model("Patient"))[name]
        rule = self.ruleset("Patient").find((name,), (element.kinds,))
        return rule.method if rule else None

    def hierarchy(self, today: date) -> Hierarchy:
        return Hierarchy(
            today=today, birth=self.quasi_method("birthDate") == "generalize",
            gender=self.quasi_method("gender") != "redact", region=self.quasi_method("address") == "generalize",
            zip3=self.zip3, birth_sex=self.extension(BIRTH_SEX_URL) is not None,
            gender_identity=self.extension(GENDER_IDENTITY_URL) is not None,
            deceased=self.quasi_method("deceasedDateTime") == "generalize",
        )


#: The profiles that ship with ehrnode, by the name ``[records] profile`` may give instead of a path.
PACKAGED = ("default", "notes")


def packaged(name: str) -> tuple[str, str]:
    """(source, text) of the packaged profile ``name``."""
    resource = importlib.resources.files("ehrnode.records") / "profiles" / f"{name}.toml"
    return f"{name} profile", resource.read_text(encoding="utf-8")


def load_profile(path: Path | str | None = None) -> Profile:
    """Load and check a profile: a file, the name of a packaged profile (``PACKAGED``), or None
    for the packaged default.

    Raises DeidentificationError (reason ``bad_profile``) naming the file and the rule
    or setting at fault: unreadable file, bad TOML, unknown table, key, method, resource
    type, element or data type, a method that cannot apply to its element's type.
    """
    if path is None or (isinstance(path, str) and "/" not in path and not path.endswith(".toml")):
        if path is not None and path not in PACKAGED:
            raise DeidentificationError(f"no packaged profile named {path!r} (packaged: {', '.join(PACKAGED)}); "
                                        "a profile file is named by its path", reason="bad_profile")
        source, text = packaged(path or "default")
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
        raise _fail(source, "[profile] extends", "must name a packaged profile (default, notes) or a profile "
                                                   "file (at most 4 deep)")
    if parent_name in PACKAGED:
        parent_source, text = packaged(parent_name)
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
    if not isinstance(directory, list) or not all(isinstance(t, str) and resource_model(t) for t in directory):
        raise _fail(source, "[references] keep", "must be a list of FHIR resource types")
    keep_display = references.get("keep_display", False)
    if not isinstance(keep_display, bool):
        raise _fail(source, "[references] keep_display", "must be true or false")

    extensions = {}
    for url, method in data.get("extensions", {}).items():
        where = f'[extensions] "{url}"'
        if ":" not in url:
            raise _fail(source, where, "is not an extension URL")
        if isinstance(method, dict):
            unknown = set(method) - {"sub", "codes"}
            sub, codes = method.get("sub", []), method.get("codes")
            if unknown or not isinstance(sub, list) or not all(isinstance(s, str) and s for s in sub) or (
                    codes is not None and (not isinstance(codes, list) or not all(isinstance(c, str) for c in codes))):
                raise _fail(source, where, "a table takes sub = [relative URLs] and codes = [codes]")
            extensions[url] = ExtensionRule(True, frozenset(sub), None if codes is None else frozenset(codes))
        elif method in ("keep", "redact"):
            extensions[url] = ExtensionRule(method == "keep")
        else:
            raise _fail(source, where, f"unknown method {method!r} (extensions take keep, redact, or a table "
                                       "with sub and codes)")

    systems = data.get("terminologies", {}).get("systems", [])
    if not isinstance(systems, list) or not all(isinstance(s, str) and ":" in s for s in systems):
        raise _fail(source, "[terminologies] systems", "must be a list of code system URIs (a prefix ends in /)")

    rules: dict[str, dict[str, Rule]] = {}
    sections = data.get("rules")
    if not sections:
        raise _fail(source, "[rules]", "missing: a profile needs at least a [rules.\"*\"] section")
    for section, entries in sections.items():
        if not isinstance(entries, dict):
            raise _fail(source, f'[rules."{section}"]', "must be a table of element = method")
        model = DOMAIN_RESOURCE if section == "*" else resource_model(section)
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
        terminologies=frozenset(systems),
    )
    patient = resource_model("Patient")
    assert patient is not None
    for element, methods in _QUASI_RULES.items():
        method = profile.quasi_method(element)
        if method not in methods and not (element in ("gender", "deceasedDateTime") and method is None):
            found = profile.ruleset("Patient").find((element,), (elements(patient)[element].kinds,))
            where = str(found) if found else f"Patient.{element}"
            raise _fail(source, where, f"Patient.{element} is a quasi-identifier: its rule must be "
                                       f"{' or '.join(methods)} (k-anonymity depends on it)")
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
        model = datatype_model(anchor)
        if model is None and anchor not in PRIMITIVES.values() and anchor != "boolean":
            raise _fail(source, where, f"{anchor} is not a FHIR data type")
        if model is None and names:
            raise _fail(source, where, f"{anchor} is a primitive type and has no elements")
        kind, parent = (anchor, None) if not names else (None, anchor)
    else:
        model, kind, parent = resource_model, None, None
    for position, step in enumerate(names):
        if model is None:
            raise _fail(source, where, f"{names[position - 1]} has no elements")
        element = elements(model).get(step)
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


