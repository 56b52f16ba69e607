"""FHIR R4 intake: bytes from a hospital in, resources we can file under a patient out.

Theory of operation
-------------------
Intake runs in two steps so the slow one can go to a worker thread:

1. :func:`read_bytes` (or :func:`read_file`, which refuses an oversized file before
   reading it) splits one input into :class:`Item` objects without judging them. An
   input is a single resource, a Bundle, or bulk NDJSON (one resource per line); the
   format is told by the content, with ``.ndjson``/``.jsonl`` names always read as
   NDJSON. Inside a Bundle, references to another entry's ``fullUrl`` (``urn:uuid:``
   or absolute) are rewritten to ``Type/id``, so later stages see one reference form
   whatever the sender used.
2. :func:`validate` judges one item: a known R4 resource type, an ``id``, the R4B
   model (R4 has no model package of its own in fhir.resources 8; R4B differs from it
   only in resources clinical data does not use), and, for patient data, a link to
   exactly one Patient.

Nothing here raises for bad input. Every fault becomes a :class:`Problem` that names
where it is (file, ``file:line`` or ``file entry[i]``), the resource, the field as a
FHIR path and what is wrong, and carries a stable ``reason``. Messages never repeat
field values: they end up in logs, and values are patient data. :func:`load` runs
both steps over many files and also catches one resource sent twice.

Bundle types: collection, transaction, batch, searchset and document are taken
entry by entry (a document is split, so its signature, if any, does not survive).
message, history and the two response types are refused as a whole: they carry
events, past versions or a server's answers, not records.

:func:`patient_id`, :func:`encounter_id`, :func:`setting_of` and
:func:`is_patient_data` read the Patient compartment (FHIR R4
CompartmentDefinition ``patient``) from the tables below; types outside it are not
patient data and are for the caller to skip, not to report.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import FhirError

#: Largest input we read; bigger files are refused from their size alone.
MAX_INPUT_BYTES = 64 * 1024 * 1024
#: Longest NDJSON line. Real resources are kilobytes; a line this long is a broken
#: export (a missing newline) or an attempt to make the parser allocate.
MAX_LINE_BYTES = 8 * 1024 * 1024
#: FHIR limits ids to 64 characters; the model does not check the length.
MAX_ID_CHARS = 64
#: What :func:`load` reads from a directory it is given.
INPUT_SUFFIXES = (".json", ".ndjson", ".jsonl")

_NDJSON_SUFFIXES = (".ndjson", ".jsonl")
_BOM = b"\xef\xbb\xbf"

#: Bundle.type -> None if its entries are taken as records, else why it is refused.
_BUNDLE_TYPES: dict[str, str | None] = {
    "collection": None,
    "transaction": None,
    "batch": None,
    "searchset": None,
    "document": None,
    "message": "a message Bundle is an event for a receiver to act on, not a set of records; "
    "send its resources as a collection",
    "history": "a history Bundle holds past versions and deletions, not current records",
    "transaction-response": "a response Bundle is a server's answer, not a submission",
    "batch-response": "a response Bundle is a server's answer, not a submission",
}

#: The element that ties a resource to its Patient, for the types of the R4 Patient
#: compartment that hold clinical or financial records of one person. Left out on
#: purpose: Group, Person, Schedule (many people), AuditEvent and Provenance
#: (metadata about other records, with targets that may span patients). Those are
#: then not patient data and are never shared, which is the safe side to err on.
_PATIENT_LINK: dict[str, tuple[str, ...]] = {
    "Account": ("subject",),
    "AdverseEvent": ("subject",),
    "AllergyIntolerance": ("patient",),
    "Appointment": ("participant", "actor"),
    "AppointmentResponse": ("actor",),
    "Basic": ("subject",),
    "BodyStructure": ("patient",),
    "CarePlan": ("subject",),
    "CareTeam": ("subject",),
    "ChargeItem": ("subject",),
    "Claim": ("patient",),
    "ClaimResponse": ("patient",),
    "ClinicalImpression": ("subject",),
    "Communication": ("subject",),
    "CommunicationRequest": ("subject",),
    "Composition": ("subject",),
    "Condition": ("subject",),
    "Consent": ("patient",),
    "Coverage": ("beneficiary",),
    "CoverageEligibilityRequest": ("patient",),
    "CoverageEligibilityResponse": ("patient",),
    "DetectedIssue": ("patient",),
    "Device": ("patient",),
    "DeviceRequest": ("subject",),
    "DeviceUseStatement": ("subject",),
    "DiagnosticReport": ("subject",),
    "DocumentManifest": ("subject",),
    "DocumentReference": ("subject",),
    "Encounter": ("subject",),
    "EnrollmentRequest": ("candidate",),
    "EpisodeOfCare": ("patient",),
    "ExplanationOfBenefit": ("patient",),
    "FamilyMemberHistory": ("patient",),
    "Flag": ("subject",),
    "Goal": ("subject",),
    "ImagingStudy": ("subject",),
    "Immunization": ("patient",),
    "ImmunizationEvaluation": ("patient",),
    "ImmunizationRecommendation": ("patient",),
    "Invoice": ("subject",),
    "List": ("subject",),
    "MeasureReport": ("subject",),
    "Media": ("subject",),
    "MedicationAdministration": ("subject",),
    "MedicationDispense": ("subject",),
    "MedicationRequest": ("subject",),
    "MedicationStatement": ("subject",),
    "MolecularSequence": ("patient",),
    "NutritionOrder": ("patient",),
    "Observation": ("subject",),
    "Procedure": ("subject",),
    "QuestionnaireResponse": ("subject",),
    "RelatedPerson": ("patient",),
    "RequestGroup": ("subject",),
    "ResearchSubject": ("individual",),
    "RiskAssessment": ("subject",),
    "ServiceRequest": ("subject",),
    "Specimen": ("subject",),
    "SupplyDelivery": ("patient",),
    "VisionPrescription": ("patient",),
}

#: Where a resource names its Encounter, for the types that do not use ``encounter``.
_ENCOUNTER_LINK: dict[str, tuple[str, ...]] = {
    "ChargeItem": ("context",),
    "Claim": ("item", "encounter"),
    "DocumentReference": ("context", "encounter"),
    "ExplanationOfBenefit": ("item", "encounter"),
    "MedicationAdministration": ("context",),
    "MedicationDispense": ("context",),
}
_DEFAULT_ENCOUNTER_LINK = ("encounter",)

_TYPE_NAME = re.compile(r"[A-Z][A-Za-z]{1,63}")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
#: A loc part that is a FHIR element name (``_birthDate`` holds a primitive's
#: extensions); anything else in a pydantic loc is the validator's own bookkeeping.
_ELEMENT = re.compile(r"_?[A-Za-z][A-Za-z0-9]*")
#: A \\uD800-\\uDFFF escape: JSON lets it stand alone, UTF-8 cannot encode the result.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
#: Abstract bases the R4B package has modules for; no resource is of these types.
_ABSTRACT = frozenset({"Resource", "DomainResource"})


@dataclass(frozen=True)
class Item:
    """One resource as read, not yet validated; ``source`` is ``file:line`` or ``file entry[i]``."""

    source: str
    resource: dict[str, Any]

    @property
    def resource_type(self) -> str | None:
        value = self.resource.get("resourceType")
        return value if isinstance(value, str) else None

    @property
    def resource_id(self) -> str | None:
        value = self.resource.get("id")
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Problem:
    """Why one resource, entry, line or file was not taken.

    ``reason`` is stable (for logs, metrics and tests): ``too_large``,
    ``unreadable``, ``empty``, ``not_utf8``, ``invalid_json``, ``too_deep``,
    ``not_object``, ``line_too_long``, ``bundle_refused``, ``bundle_invalid``,
    ``no_resource``, ``nested_bundle``, ``duplicate``, ``no_resource_type``,
    ``unknown_type``, ``no_id``, ``no_patient`` or ``invalid`` (the R4B model refused it).
    """

    source: str
    resource_type: str | None
    resource_id: str | None
    field: str | None
    message: str
    reason: str = "invalid"

    def __str__(self) -> str:
        head = self.source
        if self.resource_type or self.resource_id:
            head += f" {self.resource_type or '?'}"
            if self.resource_id:
                head += f"/{self.resource_id}"
        where = f"{self.field}: " if self.field else ""
        return f"{head}: {where}{self.message}"

    def error(self) -> FhirError:
        """This problem as the error to raise, for a caller that stops at the first one."""
        return FhirError(str(self), reason=self.reason)


@dataclass(frozen=True)
class Intake:
    """What :func:`load` took (validated items), what it did not (problems), and the
    NDJSON files that held no resource (``empty``: normal in a bulk export, not a problem)."""

    items: list[Item]
    problems: list[Problem]
    empty: list[str] = field(default_factory=list)


def read_file(path: Path) -> tuple[list[Item], list[Problem]]:
    """Read and split one file (see :func:`read_bytes`); blocks on file I/O, never raises.

    The size is checked before anything is read, and at most one byte over the
    limit is ever read, so a file that grows meanwhile is refused too.
    """
    source = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_INPUT_BYTES:
            return [], [_too_large(source, size)]
        with path.open("rb") as stream:
            data = stream.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        return [], [Problem(source, None, None, None, f"cannot read: {exc.strerror or exc}", "unreadable")]
    return read_bytes(data, source)


def read_bytes(data: bytes, name: str) -> tuple[list[Item], list[Problem]]:
    """Split one input into items without validating them; never raises.

    ``name`` is how problems and item sources refer to the input (usually its path).
    A resource sent twice in the input is kept once, the second one is a problem.
    Empty NDJSON (see :func:`is_ndjson`) gives nothing and no problem: a FHIR bulk
    export writes one file per type, and a type with no resources is an empty file.
    Any other empty input is an ``empty`` problem.
    """
    reader = _Reader(name)
    if len(data) > MAX_INPUT_BYTES:
        return [], [_too_large(name, len(data))]
    offset = 0
    if data.startswith(_BOM):
        # Some Windows exporters write one; FHIR JSON is UTF-8 and it carries nothing.
        data, offset = data[len(_BOM):], len(_BOM)
    if not data.strip():
        if not is_ndjson(name):
            reader.problem(name, "empty input: no resource in it", "empty")
    elif is_ndjson(name):
        reader.ndjson(data, offset)
    else:
        reader.document(data, offset)
    return reader.items, reader.problems


def read_value(value: Any, name: str) -> tuple[list[Item], list[Problem]]:
    """Split an input already parsed from JSON (a resource or a Bundle) as :func:`read_bytes` does."""
    reader = _Reader(name)
    reader.value(value, name)
    return reader.items, reader.problems


def is_ndjson(name: str) -> bool:
    """True for a name with an NDJSON suffix (``.ndjson``, ``.jsonl``)."""
    return name.lower().endswith(_NDJSON_SUFFIXES)


def validate(item: Item) -> Problem | None:
    """Check one item against the R4B model and what intake relies on; None if it is fine.

    Safe to call from a worker thread. The first use of each resource type imports
    its model (tens of milliseconds); later uses take a fraction of a millisecond.
    """
    resource, source = item.resource, item.source
    if not isinstance(resource, dict):
        return Problem(source, None, None, None, "expected a JSON object", "not_object")
    rtype = resource.get("resourceType")
    rid = resource.get("id")
    shown_id = _shown(rid) if isinstance(rid, str) and rid else None
    if rtype is None:
        return Problem(source, None, shown_id, None, "resourceType missing: cannot tell what resource this is",
                       "no_resource_type")
    if not isinstance(rtype, str):
        return Problem(source, None, shown_id, None, "resourceType must be a string", "unknown_type")
    if rtype == "Bundle":
        return Problem(source, rtype, shown_id, None, "a Bundle is a container, not a record", "nested_bundle")
    model = _model(rtype)
    if model is None:
        return Problem(source, _shown(rtype), shown_id, None, "unknown resourceType (not a FHIR R4 resource)",
                       "unknown_type")
    if rid is None:
        return Problem(source, rtype, None, f"{rtype}.id", "id required: a record needs a stable id", "no_id")
    problem = _model_problem(model, resource, source, rtype, shown_id, "invalid")
    if problem is not None:
        return problem
    if len(rid) > MAX_ID_CHARS:
        return Problem(source, rtype, shown_id, f"{rtype}.id", f"longer than {MAX_ID_CHARS} characters", "invalid")
    link = _PATIENT_LINK.get(rtype)
    if link is not None and patient_id(resource) is None:
        return Problem(source, rtype, shown_id, ".".join((rtype, *link)),
                       "does not reference exactly one Patient (as Patient/<id>, or urn:uuid: of a Patient "
                       "entry in the same Bundle)", "no_patient")
    return None


def check_model(resource: dict[str, Any], source: str) -> Problem | None:
    """Check a resource against its R4B model only (not what intake needs of a record); None if valid."""
    rtype = resource.get("resourceType")
    model = _model(rtype) if isinstance(rtype, str) else None
    if model is None or not isinstance(rtype, str):
        return Problem(source, None, None, None, "not a FHIR R4 resource type", "unknown_type")
    rid = resource.get("id")
    return _model_problem(model, resource, source, rtype, _shown(rid) if isinstance(rid, str) else None, "invalid")


def read_each(paths: Iterable[Path], empty: list[str]) -> Iterator[tuple[Path, list[Item], list[Problem]]]:
    """Each FHIR file of ``paths`` (see :func:`expand`) as read, not validated; the files that
    held no resource are noted in ``empty``."""
    for path in expand(paths):
        read, found = read_file(path)
        if not read and not found:
            empty.append(str(path))
        yield path, read, found


def load(paths: Iterable[Path]) -> Intake:
    """Read and validate every file (a directory stands for its INPUT_SUFFIXES files).

    Blocks on file I/O and validation (about 0.3 ms per resource). A resource that
    appears in two files is taken from the first; the second is a ``duplicate``.
    """
    items: list[Item] = []
    problems: list[Problem] = []
    empty: list[str] = []
    seen: dict[tuple[str, str], str] = {}
    for path, read, found in read_each(paths, empty):
        for item in read:
            problem = _duplicate(item.resource, item.source, seen) or validate(item)
            if problem is None:
                items.append(item)
            else:
                found.append(problem)
        # Reading and validating find problems in two passes; a user reads them in file order.
        found.sort(key=lambda problem: _position(problem.source, str(path)))
        problems.extend(found)
    return Intake(items, problems, empty)


def patient_data_types() -> list[str]:
    """The resource types a record may be: Patient and the types of its compartment."""
    return ["Patient", *sorted(_PATIENT_LINK)]


def load_models() -> int:
    """Import the model of every type a record may be, as its first use would (about 0.9 s of
    CPU and 25 MB the first time, in all); returns how many there are. A worker process does
    it as it starts, so the first input it validates after a start runs as fast as the next."""
    return sum(_model(rtype) is not None for rtype in patient_data_types())


def is_patient_data(resource: dict[str, Any]) -> bool:
    """True for the types that hold one patient's records (Patient and its compartment)."""
    rtype = resource.get("resourceType")
    return rtype == "Patient" or rtype in _PATIENT_LINK


def patient_id(resource: dict[str, Any]) -> str | None:
    """The id of the one Patient this resource belongs to, or None.

    None for non-patient data, and when the link is missing, is not a ``Patient/<id>``
    reference (a Group, a conditional ``Patient?identifier=...`` or an unresolved
    ``urn:uuid:``) or names more than one Patient.
    """
    rtype = resource.get("resourceType")
    if rtype == "Patient":
        rid = resource.get("id")
        return rid if isinstance(rid, str) else None
    link = _PATIENT_LINK.get(rtype) if isinstance(rtype, str) else None
    return None if link is None else _single_target(resource, link, "Patient")


def encounter_id(resource: dict[str, Any]) -> str | None:
    """The id of the Encounter this resource happened in (an Encounter's own id), or None.

    None too when the resource names several different Encounters.
    """
    rtype = resource.get("resourceType")
    if rtype == "Encounter":
        rid = resource.get("id")
        return rid if isinstance(rid, str) else None
    if not isinstance(rtype, str):
        return None
    return _single_target(resource, _ENCOUNTER_LINK.get(rtype, _DEFAULT_ENCOUNTER_LINK), "Encounter")


def setting_of(resource: dict[str, Any]) -> str:
    """The care setting: Encounter.class code (AMB, EMER, IMP, ...), a DocumentReference's
    practice setting code, else ``"unknown"``. Never free text: this may go on chain."""
    rtype = resource.get("resourceType")
    if rtype == "Encounter":
        found = resource.get("class")
        # R4 has one Coding; R5 made it a list of CodeableConcept, which senders mix up.
        if isinstance(found, list):
            found = _first_coding(found[0]) if found and isinstance(found[0], dict) else None
        code = found.get("code") if isinstance(found, dict) else None
        return code if isinstance(code, str) and code else "unknown"
    if rtype == "DocumentReference":
        context = resource.get("context")
        setting = context.get("practiceSetting") if isinstance(context, dict) else None
        if isinstance(setting, dict):
            coding = _first_coding(setting)
            code = coding.get("code") if coding else None
            if isinstance(code, str) and code:
                return code
    return "unknown"


class _Reader:
    """Splits one input into items and problems, remembering the (type, id) pairs seen."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.items: list[Item] = []
        self.problems: list[Problem] = []
        self.seen: dict[tuple[str, str], str] = {}

    def problem(self, source: str, message: str, reason: str, *, rtype: str | None = None,
                rid: str | None = None, field: str | None = None) -> None:
        self.problems.append(Problem(source, rtype, rid, field, message, reason))

    def document(self, data: bytes, offset: int) -> None:
        """One JSON value: a resource or a Bundle; NDJSON that did not say so by its name."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1)
            self.problem(f"{self.name}:{line}", _not_utf8(data[exc.start], column, offset + exc.start), "not_utf8")
            return
        try:
            value = _parse(text)
        except json.JSONDecodeError as exc:
            # Several values, the first on a line of its own: that is NDJSON.
            if exc.msg == "Extra data" and "\n" not in text[:exc.pos].strip():
                self.ndjson(data, offset)
            else:
                self.problem(f"{self.name}:{exc.lineno}", _json_message(exc, text), "invalid_json")
            return
        except RecursionError:
            self.problem(self.name, "invalid JSON: nested too deeply", "too_deep")
            return
        except ValueError as exc:
            self.problem(self.name, f"invalid JSON: {_clip(str(exc))}", "invalid_json")
            return
        self.value(value, self.name)

    def ndjson(self, data: bytes, offset: int) -> None:
        """One resource per line; blank lines are skipped, a trailing ``\\r`` is dropped."""
        start, number = 0, 0
        while start < len(data):
            end = data.find(b"\n", start)
            if end < 0:
                end = len(data)
            number += 1
            line, line_start, start = data[start:end], start, end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            source = f"{self.name}:{number}"
            if len(line) > MAX_LINE_BYTES:
                self.problem(source, f"line of {len(line)} bytes exceeds the limit of {MAX_LINE_BYTES}",
                             "line_too_long")
                continue
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                self.problem(source, _not_utf8(line[exc.start], exc.start, offset + line_start + exc.start),
                             "not_utf8")
                continue
            try:
                value = _parse(text)
            except json.JSONDecodeError as exc:
                self.problem(source, _json_message(exc, text), "invalid_json")
                continue
            except RecursionError:
                self.problem(source, "invalid JSON: nested too deeply", "too_deep")
                continue
            except ValueError as exc:
                self.problem(source, f"invalid JSON: {_clip(str(exc))}", "invalid_json")
                continue
            self.value(value, source)

    def value(self, value: Any, source: str) -> None:
        if not isinstance(value, dict):
            self.problem(source, f"expected a JSON object (a resource or a Bundle), got {_kind(value)}", "not_object")
        elif value.get("resourceType") == "Bundle":
            self.bundle(value, source)
        else:
            self.take(value, source)

    def bundle(self, bundle: dict[str, Any], source: str) -> None:
        bid = bundle.get("id")
        bid = _shown(bid) if isinstance(bid, str) and bid else None
        entries = bundle.get("entry")
        # The envelope is checked without the entries' resources: those are
        # validated one by one later, so a bad one costs only itself.
        envelope = dict(bundle)
        if isinstance(entries, list):
            envelope["entry"] = [
                {key: value for key, value in entry.items() if key != "resource"} if isinstance(entry, dict) else entry
                for entry in entries
            ]
        problem = _model_problem(_model("Bundle"), envelope, source, "Bundle", bid, "bundle_invalid")
        if problem is not None:
            self.problems.append(problem)
            return
        btype = bundle["type"]
        refusal = _BUNDLE_TYPES.get(btype, f"unknown Bundle type '{_shown(btype)}'")
        if refusal is not None:
            self.problem(source, refusal, "bundle_refused", rtype="Bundle", rid=bid, field="Bundle.type")
            return
        if not entries:
            self.problem(source, "Bundle has no entries", "empty", rtype="Bundle", rid=bid)
            return
        taken: list[tuple[str, dict[str, Any], Any]] = []
        for index, entry in enumerate(entries):
            where, field = f"{source} entry[{index}]", f"Bundle.entry[{index}].resource"
            resource = entry.get("resource")
            if resource is None:
                request = entry.get("request")
                method = request.get("method") if isinstance(request, dict) else None
                why = f" (a {method} request; intake takes resources, not requests)" if method else ""
                self.problem(where, f"entry has no resource{why}", "no_resource", field=field)
            elif not isinstance(resource, dict):
                self.problem(where, f"expected a JSON object, got {_kind(resource)}", "not_object", field=field)
            elif resource.get("resourceType") == "Bundle":
                self.problem(where, "a Bundle inside a Bundle is not accepted; send it as its own input",
                             "nested_bundle", rtype="Bundle", field=field)
            else:
                full_url = entry.get("fullUrl")
                if "id" not in resource and isinstance(full_url, str) and full_url.startswith("urn:uuid:"):
                    # A new resource in a transaction has no id yet; the uuid its
                    # sender gave it is as stable an id as we will get.
                    resource["id"] = full_url[len("urn:uuid:"):]
                taken.append((where, resource, full_url))
        targets: dict[str, str] = {}
        for _, resource, full_url in taken:
            rtype, rid = resource.get("resourceType"), resource.get("id")
            if isinstance(full_url, str) and isinstance(rtype, str) and isinstance(rid, str):
                targets[full_url] = f"{rtype}/{rid}"
        for where, resource, _ in taken:
            if targets:
                _rewrite_references(resource, targets)
            self.take(resource, where)

    def take(self, resource: dict[str, Any], source: str) -> None:
        problem = _duplicate(resource, source, self.seen)
        if problem is None:
            self.items.append(Item(source, resource))
        else:
            self.problems.append(problem)


def _duplicate(resource: dict[str, Any], source: str, seen: dict[tuple[str, str], str]) -> Problem | None:
    """A problem if (type, id) was seen before, else None (and it is seen from now on)."""
    rtype, rid = resource.get("resourceType"), resource.get("id")
    if not (isinstance(rtype, str) and isinstance(rid, str)):
        return None  # validation reports it; without both there is nothing to compare
    first = seen.get((rtype, rid))
    if first is None:
        seen[(rtype, rid)] = source
        return None
    return Problem(source, _shown(rtype), _shown(rid), None, f"duplicate: the same resource is at {first}", "duplicate")


# Only real resource types get in (bounded by the R4B package); misses are not cached,
# so odd names in hostile input cannot grow it.
_MODELS: dict[str, Any] = {}


def _model(rtype: str) -> Any:
    """The R4B model class for a resource type name, or None if there is no such resource."""
    model = _MODELS.get(rtype)
    if model is not None:
        return model
    if not _TYPE_NAME.fullmatch(rtype) or rtype in _ABSTRACT:
        return None
    try:
        module = importlib.import_module(f"fhir.resources.R4B.{rtype.lower()}")
    except ImportError:
        return None
    from fhir.resources.R4B.resource import Resource

    model = getattr(module, rtype, None)
    # Data types (HumanName, Coding) have modules too; only resources are records.
    if not (isinstance(model, type) and issubclass(model, Resource)):
        return None
    _MODELS[rtype] = model
    return model


def _model_problem(model: Any, resource: dict[str, Any], source: str, rtype: str, rid: str | None,
                   reason: str) -> Problem | None:
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        first = errors[0]
        field = _fhir_path(rtype, first["loc"])
        message = _error_message(first)
        others = list(dict.fromkeys(_fhir_path(rtype, error["loc"]) for error in errors[1:]))
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            message += f" (and {len(errors) - 1} more: {shown})"
        return Problem(source, rtype, rid, field, message, reason)
    except RecursionError:
        return Problem(source, rtype, rid, None, "nested too deeply to validate", "too_deep")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        # fhir.resources validators are Python; a few raise on odd input instead of reporting.
        return Problem(source, rtype, rid, None, f"cannot be validated ({type(exc).__name__})", reason)
    return None


def _fhir_path(rtype: str, loc: tuple[Any, ...]) -> str:
    """A pydantic loc such as ('name', 0, 'given') as ``Patient.name[0].given``."""
    path = rtype
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and part != "root" and _ELEMENT.fullmatch(part):
            path += f".{part}"
    return path


def _error_message(error: Any) -> str:
    kind, message = error["type"], error["msg"]
    if kind == "missing" or kind.endswith(".missing"):
        return "field required"
    if kind == "extra_forbidden":
        return "not an element of this resource in FHIR R4"
    if kind in ("json_invalid", "model_validation_format"):
        # fhir.resources reads a string given for an object as JSON text, hence json_invalid.
        return "expected a JSON object"
    message = " ".join(message.removeprefix("Value error, ").split())
    return _clip(message[:1].lower() + message[1:], 200)


def _single_target(resource: dict[str, Any], path: tuple[str, ...], target_type: str) -> str | None:
    """The one id of ``target_type`` that the references at ``path`` point to, else None."""
    found: set[str] = set()
    for reference in _at(resource, path):
        target = _target(reference)
        if target is not None and target[0] == target_type:
            found.add(target[1])
    return found.pop() if len(found) == 1 else None


def _at(value: Any, path: tuple[str, ...]) -> list[Any]:
    """Every value at ``path``, stepping through lists (FHIR repeats elements as lists)."""
    values = [value]
    for name in path:
        step: list[Any] = []
        for current in values:
            if isinstance(current, dict):
                child = current.get(name)
                if isinstance(child, list):
                    step.extend(child)
                elif child is not None:
                    step.append(child)
        values = step
    return values


def _target(reference: Any) -> tuple[str, str] | None:
    """(type, id) of a literal reference: ``Type/id``, with a base URL or ``/_history/n``.

    None for what names no resource here: conditional (``Type?...``), contained
    (``#id``), ``urn:`` and logical (identifier-only) references.
    """
    if not isinstance(reference, dict):
        return None
    text = reference.get("reference")
    if not isinstance(text, str) or "?" in text or text.startswith(("#", "urn:")):
        return None
    parts = text.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) < 2 or not _TYPE_NAME.fullmatch(parts[-2]) or not _ID.fullmatch(parts[-1]):
        return None
    return parts[-2], parts[-1]


def _rewrite_references(resource: dict[str, Any], targets: dict[str, str]) -> None:
    """Replace every Reference.reference found in ``targets`` (a fullUrl) by its ``Type/id``."""
    # A loop, not recursion: the JSON parser allows more nesting than Python's stack.
    stack: list[Any] = [resource]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            reference = value.get("reference")
            if isinstance(reference, str) and reference in targets:
                value["reference"] = targets[reference]
            stack.extend(child for child in value.values() if isinstance(child, (dict, list)))
        elif isinstance(value, list):
            stack.extend(child for child in value if isinstance(child, (dict, list)))


def _first_coding(concept: dict[str, Any]) -> dict[str, Any] | None:
    codings = concept.get("coding")
    if isinstance(codings, list) and codings and isinstance(codings[0], dict):
        return codings[0]
    return None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# Python's json takes NaN and Infinity, which neither JSON nor FHIR allows.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _parse(text: str) -> Any:
    value = _DECODER.decode(text)
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate would break every later stage that encodes text.
            raise ValueError("a string holds an unpaired \\uD800-\\uDFFF escape") from None
    return value


def _json_message(exc: json.JSONDecodeError, text: str) -> str:
    # An unterminated string is only reported when the input ran out looking for its end.
    what = exc.msg.removesuffix(" starting at").lower()
    if exc.pos >= len(text.rstrip()) or what == "unterminated string":
        return f"invalid JSON: input ends early ({what}); is it truncated?"
    return f"invalid JSON: {what} (column {exc.colno})"


def _not_utf8(byte: int, column: int, offset: int) -> str:
    return f"not UTF-8: byte 0x{byte:02x} at byte {column + 1} of the line (offset {offset} in the file)"


def _too_large(source: str, size: int) -> Problem:
    return Problem(source, None, None, None, f"input of {size} bytes exceeds the limit of {MAX_INPUT_BYTES}",
                   "too_large")


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def _shown(text: str, limit: int = 64) -> str:
    """``text`` fit for a one-line message: control characters escaped, clipped."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return _clip(text, limit)


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _position(source: str, name: str) -> tuple[int, ...]:
    """(line, entry) numbers from a source such as ``name:12 entry[3]``; () for the whole file."""
    return tuple(int(number) for number in re.findall(r"\d+", source[len(name):]))


def expand(paths: Iterable[Path]) -> list[Path]:
    """The files to read: each path as given, a directory standing for its FHIR files
    (INPUT_SUFFIXES), in name order."""
    files: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in INPUT_SUFFIXES and p.is_file()))
        else:
            files.append(path)
    return files
