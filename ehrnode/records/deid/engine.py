"""The engine: one profile under one institution key, applied to one resource at a time."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from ...errors import DeidentificationError
from ..kanon import OLDEST_AGE, SUPPRESSED, Hierarchy, QuasiIdentifiers, age_on, choose_levels, quasi_identifiers, zip3
from .dates import DATE_FORM, shift_date
from .profile import Profile, RuleSet
from .schema import PRIMITIVE_EXTENSION, Element, required_elements, resource_model
from .text import scrub_markup, scrub_text

KEY_SIZE = 32
#: Patient elements :mod:`..kanon` writes at the patient's k-anonymity level.
QUASI_KEYS = frozenset({"birthDate", "_birthDate", "gender", "_gender", "address"})
_DAR = {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "masked"}
_LABEL_ID = b"ehrnode/deid/pseudonym\x00"
_LABEL_IDENTIFIER = b"ehrnode/deid/identifier\x00"
_LABEL_SHIFT = b"ehrnode/deid/date-shift\x00"


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
            raise unreleasable("a resource must be a JSON object")
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
    rules: RuleSet
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
        model = resource_model(rtype) if isinstance(rtype, str) else None
        if model is None:
            raise unreleasable(f"unknown resource type {rtype!r}")
        if rtype == "Bundle":
            raise unreleasable("a Bundle is not released as one; de-identify its entries one by one")
        frame = _Frame(rtype, self.profile.ruleset(rtype), nested)
        skip = QUASI_KEYS if rtype == "Patient" else frozenset()
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
                raise unreleasable(f"{frame.rtype}: unknown element {'.'.join(path + (name,))!r}")
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

    def _walked(self, element: Element, value: Mapping[str, Any], frame: _Frame, path: tuple[str, ...],
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

    def _primitive(self, element: Element, value: Any, parent: Mapping[str, Any], method: str | None,
                   frame: _Frame, path: tuple[str, ...]) -> Any:
        if method is None or method == "keep":
            return value
        where = f"{frame.rtype}.{'.'.join(path)}"
        if not isinstance(value, str):
            raise unreleasable(f"{where}: {method} needs a string, got {type(value).__name__}")
        if method == "date-shift":
            try:
                return shift_date(value, self.offset)
            except ValueError as exc:
                raise unreleasable(f"{where}: {exc}") from exc
        if method == "generalize":
            m = DATE_FORM.fullmatch(value)
            if m is None:
                raise unreleasable(f"{where}: {value!r} is not a FHIR date")
            if path[-1] == "birthDate":
                age = age_on(value, self.deid.today)
                if age is not None and age >= OLDEST_AGE:
                    return _DROP  # any year would reveal an age over 89
            return m.group(1)
        if method == "pseudonym":
            return self._pseudonym(element.type, value, frame, path)
        if method == "scrub":
            if element.type == "xhtml":
                return scrub_markup(value)
            if element.type == "base64Binary":
                return _scrub_base64(value, parent)
            return scrub_text(value)
        if method == "coded-text":
            codings = parent.get("coding") if isinstance(parent, Mapping) else None
            displays = {c["display"].strip().casefold() for c in codings or ()
                        if isinstance(c, Mapping) and isinstance(c.get("display"), str)}
            return value if value.strip().casefold() in displays else _DROP
        raise unreleasable(f"{where}: {method} cannot apply to {element.type}")

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
        out = self.walk(value, PRIMITIVE_EXTENSION, frame, path, chain)
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
        scrubbed = scrub_markup(text) if ("html" in mime or "xml" in mime) else scrub_text(text)
        return base64.b64encode(scrubbed.encode(charset)).decode("ascii")
    except (ValueError, LookupError, UnicodeError):
        return _DROP

