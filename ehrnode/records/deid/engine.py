"""The engine: one profile under one institution key, applied to one resource at a time."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from ...errors import DeidentificationError
from ..kanon import (
    OLDEST_AGE,
    QUASI_EXTENSIONS,
    SUPPRESSED,
    Hierarchy,
    QuasiIdentifiers,
    age_on,
    choose_levels,
    place,
    quasi_identifiers,
    zip3,
)
from .dates import DATE_FORM, shift_date
from .notes import PatientFacts, scrub_note
from .profile import ExtensionRule, Profile, RuleSet
from .schema import PRIMITIVE_EXTENSION, Element, required_elements, resource_model
from .text import has_pattern, scrub_markup

KEY_SIZE = 32
#: Patient elements :mod:`..kanon` writes at the patient's k-anonymity level.
QUASI_KEYS = frozenset({"birthDate", "_birthDate", "gender", "_gender", "address", "deceasedDateTime",
                        "_deceasedDateTime", "deceasedBoolean", "_deceasedBoolean"})
_DAR = {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "masked"}
_LABEL_ID = b"ehrnode/deid/pseudonym\x00"
_LABEL_IDENTIFIER = b"ehrnode/deid/identifier\x00"
_LABEL_SHIFT = b"ehrnode/deid/date-shift\x00"
_LABEL_CODE = b"ehrnode/deid/code\x00"
#: Observation codes that say the value is the patient's age (LOINC, SNOMED CT).
AGE_CODES = frozenset({
    ("http://loinc.org", c) for c in ("30525-0", "21612-7", "29553-5", "21611-9", "63900-5", "35659-2", "46251-5")
} | {("http://snomed.info/sct", c) for c in ("424144002", "397659008")})
#: Elements of these names whose Range or Quantity is an age (FamilyMemberHistory.ageRange, ...).
_AGE_ELEMENTS = ("age", "onset", "abatement", "deceased")
_TIME_UNITS = {"a": 1.0, "mo": 12.0, "wk": 52.1775, "d": 365.25, "h": 8766.0, "min": 525960.0}
_CODE_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,63}")
# A terminology's edition or release: dotted numbers ("2.74", "4.0.1") or a SNOMED CT edition
# URI; anything else in Coding.version (free text, a number long enough to be an id) is dropped.
_VERSION = re.compile(r"\d{1,4}(?:\.\d{1,4}){0,3}|http://snomed\.info/sct/\d{1,18}(?:/version/\d{8})?")
_OPEN_CODE = re.compile(r"[a-z0-9][a-z0-9.-]{0,63}")
_MIME = re.compile(r"[a-z]+/[a-z0-9.+-]+(?:\s*;\s*[a-z]+=\"?[A-Za-z0-9._-]+\"?)*", re.IGNORECASE)
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8}){0,3}")
_UNIT = re.compile(r"[\w%/.\[\]{}*^'()°µ-]{1,20}")
_ELEMENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
#: A reference to a provider or place is kept only in these shapes (anything else may hold text).
_DIRECTORY_QUERY = re.compile(r"[A-Z][A-Za-z]+\?identifier=[A-Za-z0-9:/._%-]*\|[A-Za-z0-9._-]{1,64}")


def unreleasable(message: str) -> DeidentificationError:
    return DeidentificationError(message, reason="unreleasable")


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



_DROP: Any = object()
#: Attachments released scrubbed: prose. Structured content (JSON, XML, CDA) could hold
#: identifiers under any key, and images and PDFs cannot be scrubbed: they are dropped.
_TEXT_TYPES = frozenset({"text/plain", "text/markdown", "text/html", "application/xhtml+xml"})


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

    def code_value(self, system: object, code: str) -> str:
        """The pseudonym of a local code (``system|code``): the same code, the same pseudonym."""
        return self._uuid(self._digest(_LABEL_CODE, f"{system}|{code}"))

    def resource_id(self, resource_type: str, value: str) -> str:
        """The released id of a resource: kept for providers and places, else a pseudonym."""
        return value if resource_type in self.profile.directory else self.pseudonym(value)

    def local_id(self, value: str) -> str:
        """The released id of a contained resource (local to its container)."""
        return self.pseudonym("#" + value)

    def reference(self, text: str) -> str:
        """A Reference.reference as released; lines up with :meth:`resource_id`."""
        if text.startswith("#"):
            return "#" + self.local_id(text[1:]) if len(text) > 1 else text  # a contained resource
        m = _LITERAL_REF.fullmatch(text)
        if m:
            rtype, rid = m.groups()
            return text if rtype in self.profile.directory else f"{rtype}/{self.pseudonym(rid)}"
        if text.startswith("urn:uuid:"):
            return "urn:uuid:" + self.pseudonym(text[len("urn:uuid:"):])
        m = _CONDITIONAL_REF.fullmatch(text)
        if m:
            # A search cannot be resolved here; the whole query gets one stable pseudonym. A
            # provider or place found by its identifier is kept; by anything else (a name), not.
            keep = m.group(1) in self.profile.directory and _DIRECTORY_QUERY.fullmatch(text)
            return text if keep else f"{m.group(1)}/{self.pseudonym(text)}"
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

    def deidentify(self, resource: Mapping[str, Any], *, patient: str, level: int = 0,
                   facts: PatientFacts | None = None, found: Counter[str] | None = None) -> dict[str, Any]:
        """The released form of ``resource`` (a new dict; the input is not changed).

        ``patient`` is the local id of the Patient the resource belongs to (a Patient's
        own id); ``level`` the k-anonymity level of that patient (0 to SUPPRESSED), used
        for a Patient's quasi-identifiers; ``facts`` what its Patient resource says, which
        free text released scrubbed is searched for (:mod:`.notes`; for a Patient, its own
        resource is used). Raises DeidentificationError (``unreleasable``)
        for a resource the schema does not know, a Bundle (release its entries one by one),
        a date that cannot be shifted, or a modifier extension that would be dropped.
        ``found``, if given, counts by kind what scrubbing took out of free text.
        """
        if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= SUPPRESSED:
            raise DeidentificationError(f"k-anonymity level {level!r} is not in 0..{SUPPRESSED}", reason="bad_level")
        if not isinstance(resource, Mapping):
            raise unreleasable("a resource must be a JSON object")
        if facts is None and resource.get("resourceType") == "Patient":
            facts = PatientFacts.of(resource)
        return _Pass(self, patient, level, facts, found).resource(resource, nested=False)

    def choose_levels(self, population: Mapping[str, QuasiIdentifiers], k: int | None = None, *,
                      released: Mapping[str, Iterable[str | None]] | None = None) -> dict[str, int]:
        """:func:`.kanon.choose_levels` with this profile's hierarchy and k (unless given)."""
        return choose_levels(population, self.profile.k if k is None else k, hierarchy=self.hierarchy,
                             released=released)


@dataclass(frozen=True, slots=True)
class _Frame:
    """The resource being walked: its type, its rules, and whether it sits inside another."""

    rtype: str
    rules: RuleSet
    nested: bool


class _Pass:
    """One call of :meth:`Deidentifier.deidentify`: the patient, its offset, its level."""

    def __init__(self, deid: Deidentifier, patient: str, level: int, facts: PatientFacts | None,
                 found: Counter[str] | None) -> None:
        self.deid = deid
        self.found = found
        self.profile = deid.profile
        self.patient = patient
        self.level = level
        self.facts = facts
        self._offset: int | None = None

    @property
    def offset(self) -> int:
        if self._offset is None:
            self._offset = self.deid.date_shift_days(self.patient)
        return self._offset

    def resource(self, node: Mapping[str, Any], *, nested: bool) -> dict[str, Any]:
        rtype = node.get("resourceType")
        model = resource_model(rtype) if isinstance(rtype, str) else None
        if model is None:
            raise unreleasable(f"unknown resource type {_shown(rtype)}")
        if rtype == "Bundle":
            raise unreleasable("a Bundle is not released as one; de-identify its entries one by one")
        assert isinstance(rtype, str)  # a model was found for it
        frame = _Frame(rtype, self.profile.ruleset(rtype, contained=nested), nested)
        skip = QUASI_KEYS if rtype == "Patient" else frozenset()
        raw = node
        if rtype == "Patient" and isinstance(node.get("extension"), list):
            # Birth sex and gender identity are k-anonymity's to write, at the patient's level.
            node = {**node, "extension": [e for e in node["extension"]
                                          if not (isinstance(e, Mapping) and _str(e.get("url")) in QUASI_EXTENSIONS)]}
        out: dict[str, Any] = {"resourceType": rtype}
        out.update(self.walk(node, model, frame, (), (), skip))
        if rtype == "Patient":
            released = self.deid.hierarchy.elements(quasi_identifiers(raw), self.level)
            extensions = released.pop("extension", [])
            out.update(released)
            if extensions:
                out["extension"] = out.get("extension", []) + extensions
        if rtype == "Observation":
            _observation_ages(node, out)
        self._require(model, node, out)
        return out

    def walk(self, node: Mapping[str, Any], model: type, frame: _Frame, path: tuple[str, ...],
             chain: tuple[tuple[str, ...], ...], skip: frozenset[str] = frozenset()) -> dict[str, Any]:
        """The released children of ``node`` (an element or resource of type ``model``)."""
        if not isinstance(node, Mapping):
            raise unreleasable(f"{frame.rtype}.{'.'.join(path)}: expected a JSON object")
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
                shown = ".".join(path + (name,)) if _ELEMENT_NAME.fullmatch(name) else ".".join(path + ("?",))
                raise unreleasable(f"{frame.rtype}: unknown element {shown}")
            element, method, epath, echain = step.element, step.method, step.path, step.chain
            if method == "redact" and element.type != "Extension":  # an extension's URL rule comes first
                result = _DROP
            elif companion_only:
                result = self._companion(value, frame, epath, echain)
            else:
                result = self._value(element, value, node, method, frame, epath, echain)
            if name == "modifierExtension" and (result is _DROP or len(result) < len(value)):
                raise unreleasable(f"{frame.rtype}: a modifier extension at {'.'.join(path) or 'the root'} "
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

    def _value(self, element: Element, value: Any, parent: Mapping[str, Any], method: str | None,
               frame: _Frame, path: tuple[str, ...], chain: tuple[tuple[str, ...], ...]) -> Any:
        if element.many:
            if not isinstance(value, list):
                raise unreleasable(f"{frame.rtype}.{'.'.join(path)}: expected a list")
            if element.model is None and element.type != "Resource":
                items = [None if v is None else self._primitive(element, v, parent, method, frame, path) for v in value]
            else:
                items = [self._complex(element, v, method, frame, path, chain) for v in value]
            items = [v for v in items if v is not _DROP]
            return items if any(v is not None for v in items) else _DROP
        if element.model is None and element.type != "Resource":
            return self._primitive(element, value, parent, method, frame, path)
        return self._complex(element, value, method, frame, path, chain)

    def _complex(self, element: Element, value: Any, method: str | None, frame: _Frame,
                 path: tuple[str, ...], chain: tuple[tuple[str, ...], ...]) -> Any:
        if not isinstance(value, Mapping):
            raise unreleasable(f"{frame.rtype}.{'.'.join(path)}: expected a JSON object")
        kind = element.type
        if kind == "Resource":
            return self.resource(value, nested=True)
        if kind == "Extension":
            rule = self.profile.extension(value.get("url"))
            if rule is None or method == "redact":
                return _DROP  # allow-listed extensions only
            return self._extension(element, value, rule, frame, path, chain)
        if kind == "Range" and path[-1].startswith(_AGE_ELEMENTS):
            return _generalized_range(value)
        if method == "coded":
            return self._coded(element, value, frame, path, chain)
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

    def _extension(self, element: Element, value: Mapping[str, Any], rule: ExtensionRule, frame: _Frame,
                   path: tuple[str, ...], chain: tuple[tuple[str, ...], ...]) -> Any:
        """An allow-listed extension: its value through the element rules, and only the
        sub-extensions the rule names (each the same way); its valueCode only from ``codes``."""
        if rule.codes is not None and "valueCode" in value and _str(value.get("valueCode")) not in rule.codes:
            return _DROP
        subs = value.get("extension")
        kept_subs = []
        if isinstance(subs, list):
            for sub in subs:
                if isinstance(sub, Mapping) and _str(sub.get("url")) in rule.sub:
                    kept = self._extension(element, sub, _SUB_RULE, frame, path, chain)
                    if kept is not _DROP:
                        kept_subs.append(kept)
        own = {k: v for k, v in value.items() if k not in ("extension", "url")}
        assert element.model is not None  # an Extension is a complex type
        out = self.walk(own, element.model, frame, path, chain) if own else {}
        if kept_subs:
            out["extension"] = kept_subs
        if not any(k.startswith(("value", "_value")) or k == "extension" for k in out):
            return _DROP
        return {"url": value["url"], **out}

    def _coded(self, element: Element, value: Mapping[str, Any], frame: _Frame, path: tuple[str, ...],
               chain: tuple[tuple[str, ...], ...]) -> Any:
        """A Coding or Quantity by the allow-list of terminologies (the ``coded`` method)."""
        system = value.get("system")
        known = self.profile.known(system)
        if element.type == "Coding":
            if known:
                out = {k: value[k] for k in ("system", "userSelected") if k in value}
                version = value.get("version")
                if isinstance(version, str) and _VERSION.fullmatch(version):
                    out["version"] = version  # an edition or release, never free text
                code = value.get("code")
                if isinstance(code, str) and _CODE_TOKEN.fullmatch(code):
                    out["code"] = code
                display = value.get("display")
                if isinstance(display, str) and not has_pattern(display):
                    out["display"] = display
            else:
                # A local code system: its codes may mean something here, its displays anything
                # at all. The link survives (keyed), the text does not.
                out = {}
                if isinstance(system, str):
                    out["system"] = "urn:uuid:" + self.deid.pseudonym(system)
                if isinstance(value.get("code"), str):
                    out["code"] = self.deid.code_value(system, value["code"])
            return out or _DROP
        # A Quantity (or Age, Duration, Count, Distance): the number, and its unit only where it
        # is a known one.
        out = {k: value[k] for k in ("value", "comparator") if k in value}
        code, unit = value.get("code"), value.get("unit")
        if known and isinstance(code, str) and _CODE_TOKEN.fullmatch(code):
            out.update(system=system, code=code)
            if isinstance(unit, str) and (unit == code or (_UNIT.fullmatch(unit) and not has_pattern(unit))):
                out["unit"] = unit
        elif isinstance(unit, str) and _UNIT.fullmatch(unit) and not has_pattern(unit) and not code:
            out["unit"] = unit
        return out or _DROP

    def _walked(self, element: Element, value: Mapping[str, Any], frame: _Frame, path: tuple[str, ...],
                chain: tuple[tuple[str, ...], ...]) -> Any:
        assert element.model is not None
        out = self.walk(value, element.model, frame, path, chain)
        if element.type == "Attachment":
            _fix_attachment(value, out)
        if not any(k != "id" for k in out):
            return _DROP
        self._require(element.model, value, out)
        return out

    def _primitive(self, element: Element, value: Any, parent: Mapping[str, Any], method: str | None,
                   frame: _Frame, path: tuple[str, ...]) -> Any:
        if method is None or method == "keep":
            return _checked_code(element, value) if element.type == "code" else value
        where = f"{frame.rtype}.{'.'.join(path)}"
        if not isinstance(value, str):
            raise unreleasable(f"{where}: {method} needs a string, got {type(value).__name__}")
        if method == "coded":
            return value if self.profile.known(value) else _DROP
        if method == "date-shift":
            try:
                return shift_date(value, self.offset)
            except ValueError as exc:
                raise unreleasable(f"{where}: {exc}") from exc
        if method == "generalize":
            m = DATE_FORM.fullmatch(value)
            if m is None:
                raise unreleasable(f"{where}: not a FHIR date")
            if path[-1] in ("birthDate", "bornDate"):
                age = age_on(value, self.deid.today)
                if age is not None and age >= OLDEST_AGE:
                    return _DROP  # any year would reveal an age over 89
            return m.group(1)
        if method == "pseudonym":
            return self._pseudonym(element.type, value, frame, path)
        if method == "scrub":
            if element.type == "xhtml":
                return scrub_markup(value, self._scrub)
            if element.type == "base64Binary":
                return _scrub_base64(value, parent, self._scrub)
            return self._scrub(value)
        if method == "coded-text":
            codings = parent.get("coding") if isinstance(parent, Mapping) else None
            displays = {c["display"].strip().casefold() for c in codings or ()
                        if isinstance(c, Mapping) and isinstance(c.get("display"), str)
                        and self.profile.known(c.get("system"))}
            return value if value.strip().casefold() in displays else _DROP
        raise unreleasable(f"{where}: {method} cannot apply to {element.type}")

    def _scrub(self, text: str) -> str:
        """Free text as the scrub method releases it: the patient's identifiers, dates (moved by
        its offset), ages over 89, identifying patterns and other people's names taken out."""
        scrubbed = scrub_note(text, self.facts, self.offset)
        if self.found is not None:
            self.found.update(f.kind for f in scrubbed.findings)
        return scrubbed.text

    def _pseudonym(self, kind: str, value: str, frame: _Frame, path: tuple[str, ...]) -> str:
        if path == ("id",):
            # A contained resource's id is only an anchor for "#id" references inside its
            # container; it is pseudonymized alike there and in every "#id" (it may be any text).
            return self.deid.local_id(value) if frame.nested else self.deid.resource_id(frame.rtype, value)
        if kind == "uri":
            # An identifier's system: a known one says only what kind of identifier it is.
            return value if self.profile.known(value) else self.deid.reference(value)
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
        out = self.walk(value, PRIMITIVE_EXTENSION, frame, path, chain)
        return out if "extension" in out else _DROP

    def _reference(self, ref: Mapping[str, Any], targets: frozenset[str]) -> Any:
        text, kind = ref.get("reference"), ref.get("type")
        target = _reference_target(text, kind)
        # Without a type in the reference, the element's definition may still say that it
        # can only point to providers or places.
        directory = self.profile.directory
        parses = text is None or (isinstance(text, str) and (
            _LITERAL_REF.fullmatch(text) is not None or _DIRECTORY_QUERY.fullmatch(text) is not None))
        if parses and (target in directory or (target is None and targets and targets <= directory)):
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
        country, state = place(address.get("country")), place(address.get("state"))
        out = {}
        if country is not None:
            out["country"] = country
        if state is not None:
            out["state"] = state
        postal = address.get("postalCode")
        short = zip3(postal, country if isinstance(country, str) else None) if isinstance(postal, str) else None
        if self.profile.zip3 and short is not None:
            out["postalCode"] = short
        return out or _DROP

    @staticmethod
    def _generalized_age(age: Mapping[str, Any]) -> Any:
        """An Age: "90 or more" from 90 years on (a number without a time unit is taken as years);
        else its number, comparator and time unit."""
        value, unit = age.get("value"), age.get("code") or age.get("unit")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            years = value / _TIME_UNITS.get(unit if isinstance(unit, str) else "", 1.0)
            if years >= OLDEST_AGE:
                return dict(_NINETY_PLUS)
        out = {k: age[k] for k in ("value", "comparator") if k in age}
        if unit in _TIME_UNITS:
            out.update({k: age[k] for k in ("unit", "system", "code") if k in age})
        return out or _DROP

    @staticmethod
    def _require(model: type, before: Mapping[str, Any], after: dict[str, Any]) -> None:
        """Mark each required element that was present and had to go as masked (data-absent-reason)."""
        for element in required_elements(model):
            name = element.name
            if name in after or "_" + name in after:
                continue
            if name not in before and "_" + name not in before:
                continue
            if element.model is not None:
                after[name] = [{"extension": [dict(_DAR)]}] if element.many else {"extension": [dict(_DAR)]}
            elif not element.many:
                after["_" + name] = {"extension": [dict(_DAR)]}


#: A sub-extension named by its parent's rule: its value through the rules, nothing below it.
_SUB_RULE = ExtensionRule(True)


def _shown(value: Any) -> str:
    """A value from the input as an error message may show it: only a short FHIR name."""
    return repr(value) if isinstance(value, str) and _ELEMENT_NAME.fullmatch(value) else "(not a FHIR name)"


def _checked_code(element: Element, value: Any) -> Any:
    """A ``code`` element's value if it is one its binding allows (or, unbound, a code-shaped
    token), else dropped: a code element can hold any string, and only codes are released."""
    if not isinstance(value, str):
        return _DROP
    if element.codes and not element.open_codes:
        return value if value in element.codes else _DROP
    if element.open_codes:
        return value if value in element.codes or _OPEN_CODE.fullmatch(value) else _DROP
    if element.name == "contentType":
        return value if _MIME.fullmatch(value) else _DROP
    if element.name == "language":
        return value if _LANGUAGE.fullmatch(value) else _DROP
    return value if _CODE_TOKEN.fullmatch(value) and not has_pattern(value) else _DROP


def _years(quantity: Any) -> float | None:
    """A Quantity's value in years, if its unit is a time unit."""
    if not isinstance(quantity, Mapping):
        return None
    value, unit = quantity.get("value"), quantity.get("code") or quantity.get("unit")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or unit not in _TIME_UNITS:
        return None
    return value / _TIME_UNITS[unit]


_NINETY_PLUS = {"value": OLDEST_AGE, "comparator": ">=", "unit": "a", "system": "http://unitsofmeasure.org",
                "code": "a"}


def _generalized_range(value: Mapping[str, Any]) -> Any:
    """A Range that is an age: "90 or more" when either end is 90 years or more; else its ends
    as time quantities (numbers and time units only)."""
    ends = {k: value.get(k) for k in ("low", "high")}
    if any((_years(end) or 0) >= OLDEST_AGE for end in ends.values()):
        return {"low": {k: v for k, v in _NINETY_PLUS.items() if k != "comparator"}}
    out = {}
    for name, end in ends.items():
        if isinstance(end, Mapping) and _years(end) is not None:
            out[name] = {k: end[k] for k in ("value", "unit", "system", "code") if k in end}
    return out or _DROP


def _observation_ages(raw: Mapping[str, Any], out: dict[str, Any]) -> None:
    """An Observation (or component) coded as the patient's age: its value is an age, so 90
    years or more becomes "90 or more", in a Quantity, a Range or a bare integer."""
    def is_age(node: Mapping[str, Any]) -> bool:
        codings = (node.get("code") or {}).get("coding") if isinstance(node.get("code"), Mapping) else None
        return any(isinstance(c, Mapping) and (_str(c.get("system")), _str(c.get("code"))) in AGE_CODES
                   for c in codings or ())

    def fix(raw_node: Mapping[str, Any], node: dict[str, Any]) -> None:
        if not is_age(raw_node):
            return
        if (_years(raw_node.get("valueQuantity")) or 0) >= OLDEST_AGE:
            node["valueQuantity"] = dict(_NINETY_PLUS)
        if isinstance(raw_node.get("valueInteger"), int) and raw_node["valueInteger"] >= OLDEST_AGE:
            node.pop("valueInteger", None)
            node["valueQuantity"] = dict(_NINETY_PLUS)
        if isinstance(raw_node.get("valueRange"), Mapping):
            ranged = _generalized_range(raw_node["valueRange"])
            if ranged is _DROP:
                node.pop("valueRange", None)
            else:
                node["valueRange"] = ranged

    fix(raw, out)
    for raw_part, part in zip(raw.get("component") or (), out.get("component") or (), strict=False):
        if isinstance(raw_part, Mapping) and isinstance(part, dict):
            fix(raw_part, part)


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


def _scrub_base64(value: str, attachment: Mapping[str, Any], scrub: Callable[[str], str]) -> Any:
    """Decode a text attachment, scrub it and encode it again; anything else is dropped."""
    content_type = attachment.get("contentType") if isinstance(attachment, Mapping) else None
    if not isinstance(content_type, str):
        return _DROP
    mime, _, params = content_type.partition(";")
    mime = mime.strip().lower()
    if mime not in _TEXT_TYPES:
        return _DROP  # images, PDFs: nothing can be scrubbed, so nothing is released
    m = re.search(r"charset\s*=\s*\"?([A-Za-z0-9._-]+)", params)
    charset = m.group(1) if m else "utf-8"
    try:
        text = base64.b64decode(value, validate=True).decode(charset)
        scrubbed = scrub_markup(text, scrub) if ("html" in mime or "xml" in mime) else scrub(text)
        return base64.b64encode(scrubbed.encode(charset)).decode("ascii")
    except (ValueError, LookupError, UnicodeError):
        return _DROP


def _str(value: Any) -> str | None:
    """``value`` if it is a string: a list or a map where a string belongs tests as absent."""
    return value if isinstance(value, str) else None
