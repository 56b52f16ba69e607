"""The consortium's answers as FHIR R4 resources, and FHIR input as method-table parameters.

Pure functions, no I/O: a searchset Bundle, DocumentReferences for anchors, Patients for EMPI
matches (carrying nothing but the EMPI: demographics never leave the member that holds them),
Consent resources for consent entries and back, and the CapabilityStatement.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from ..empi.matching import CERTAIN
from ..sharing.audit import PURPOSE_OF_USE
from .outcome import FhirFailure

EMPI_SYSTEM = "urn:ehrnode:empi"
RECORD_SYSTEM = "urn:ehrnode:record"
MATCH_GRADE = "http://hl7.org/fhir/StructureDefinition/match-grade"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
FHIR_VERSION = "4.0.1"
#: HL7 v3 PurposeOfUse code -> the purpose a pull is made for.
PURPOSE_BY_CODE = {code: purpose for purpose, (code, _) in PURPOSE_OF_USE.items()}


#: The last instant a FHIR dateTime can show (9999-12-31T23:59:59.999Z), in milliseconds.
LAST_MS = 253_402_300_799_999


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def instant(ms: int) -> str:
    """A FHIR instant (exact to the millisecond); times past the last one a date can show are shown as it."""
    moment = _EPOCH + min(max(ms, 0), LAST_MS) * _MS
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_end(text: Any, where: str) -> int:
    """The end of a period in milliseconds: a dateTime, or a date (its whole day, UTC)."""
    if not isinstance(text, str):
        raise FhirFailure(422, "invalid", f"{where} must be a FHIR dateTime")
    whole_day = len(text) == 10
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise FhirFailure(422, "invalid", f"{where}: {text[:40]!r} is not a FHIR dateTime or date") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    ms = (moment - _EPOCH) // _MS + (86_400_000 - 1 if whole_day else 0)
    if not 0 < ms <= LAST_MS:
        raise FhirFailure(422, "invalid", f"{where}: {text[:40]!r} is not between 1970 and 9999")
    return ms


def searchset(entries: list[dict[str, Any]], self_url: str) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(entries),
            "link": [{"relation": "self", "url": self_url}], "entry": entries}


def empi_identifier(empi: str) -> dict[str, str]:
    return {"system": EMPI_SYSTEM, "value": empi}


# --- Patient/$match -------------------------------------------------------------------------

def match_entries(found: dict[str, Any], *, only_certain: bool, count: int) -> list[dict[str, Any]]:
    """``empi.lookup``'s answer as $match entries: one Patient per EMPI, best first, with its
    score (0..1: 1 for an equal national id, else the match weight over the weight graded
    certain) and match grade."""
    best: dict[str, tuple[float, str]] = {}
    if found["empi"] is not None and not found["candidates"]:
        best[found["empi"]] = (1.0, found["grade"])  # the same national id
    for candidate in found["candidates"]:
        evidence = candidate["evidence"]
        score = 1.0 if evidence["national_id"] == "same" else round(min(evidence["total"], CERTAIN) / CERTAIN, 3)
        empi = candidate["empi"]
        if empi is not None and (empi not in best or best[empi][0] < score):
            best[empi] = (max(score, 0.0), candidate["grade"])
    ranked = sorted(best.items(), key=lambda item: (-item[1][0], item[0]))
    if only_certain:
        ranked = [item for item in ranked if item[1][1] == "certain"]
    return [{
        "resource": {"resourceType": "Patient", "id": empi, "identifier": [empi_identifier(empi)]},
        "search": {"mode": "match", "score": score,
                   "extension": [{"url": MATCH_GRADE, "valueCode": grade}]},
    } for empi, (score, grade) in ranked[:count]]


# --- DocumentReference ----------------------------------------------------------------------

def document_reference(anchor: dict[str, Any], base: str) -> dict[str, Any]:
    """One anchored record (``records.list``) as a DocumentReference pointing where to pull it."""
    rtype, record = anchor["resource_type"], anchor["record_id"]
    return {
        "resourceType": "DocumentReference", "id": record,
        "masterIdentifier": {"system": RECORD_SYSTEM, "value": record},
        "status": "current",
        "type": {"text": rtype},
        "subject": {"identifier": empi_identifier(anchor["empi"])},
        "date": instant(anchor["recorded_at"]),
        "custodian": {"display": anchor["institution"]},
        "content": [{"attachment": {"contentType": "application/fhir+json", "url": f"{base}/{rtype}/{record}"}}],
        "context": {"related": [{"identifier": {"system": "urn:ehrnode:tx", "value": anchor["tx_id"]}}]},
    }


# --- Consent --------------------------------------------------------------------------------

_CONSENT_SCOPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy", "display": "Privacy Consent"}]}
_CONSENT_CATEGORY = [{"coding": [{"system": "http://loinc.org", "code": "59284-0",
                                  "display": "Patient Consent"}]}]
_RECIPIENT = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                          "code": "IRCP", "display": "information recipient"}]}
_POLICY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]}


def consent_resource(entry: dict[str, Any], now_ms: int) -> dict[str, Any]:
    """One consent entry (``consent.show``) as a Consent: a grant is a permit, a revocation a deny."""
    provision: dict[str, Any] = {"type": "permit" if entry["action"] == "grant" else "deny"}
    if entry["until"] is not None:
        provision["period"] = {"end": instant(entry["until"])}
    if entry["grantee"] != "*":
        provision["actor"] = [{"role": _RECIPIENT, "reference": {"reference": f"Organization/{entry['grantee']}",
                                                                  "display": entry["grantee"]}}]
    if "*" not in entry["purposes"]:
        provision["purpose"] = [{"system": ACT_REASON, "code": PURPOSE_OF_USE[p][0], "display": PURPOSE_OF_USE[p][1]}
                                for p in entry["purposes"]]
    if "*" not in entry["scope"]:
        provision["class"] = [{"system": RESOURCE_TYPES, "code": t} for t in entry["scope"]]
    expired = entry["until"] is not None and entry["until"] <= now_ms
    return {
        "resourceType": "Consent", "id": entry["tx_id"], "status": "inactive" if expired else "active",
        "scope": _CONSENT_SCOPE, "category": _CONSENT_CATEGORY,
        "patient": {"identifier": empi_identifier(entry["empi"])},
        "dateTime": instant(entry["time"]),
        "organization": [{"display": entry["grantor"]}],
        "policyRule": _POLICY,
        "provision": provision,
    }


def consent_params(consent: dict[str, Any], members: set[str], now_ms: int) -> tuple[str, dict[str, Any]]:
    """The method (``consent.grant`` or ``consent.revoke``) and parameters a posted Consent asks for.
    Anything it says that would not be recorded as it means is refused, not dropped."""
    if consent.get("resourceType") != "Consent":
        raise FhirFailure(400, "invalid", f"expected a Consent, got {_shown(consent.get('resourceType'))}")
    if consent.get("status") != "active":
        raise FhirFailure(422, "business-rule", f"Consent.status {_shown(consent.get('status'))}: only an active "
                                                "Consent is recorded")
    patient = consent.get("patient")
    identifier = patient.get("identifier") if isinstance(patient, dict) else None
    if not isinstance(identifier, dict) or identifier.get("system") != EMPI_SYSTEM:
        raise FhirFailure(422, "required", f"Consent.patient.identifier must be {{system: {EMPI_SYSTEM}, value: EMPI}}")
    provision = consent.get("provision")
    if not isinstance(provision, dict) or provision.get("type") not in ("permit", "deny"):
        raise FhirFailure(422, "required", "Consent.provision.type must be permit or deny")
    unknown = set(provision) - {"type", "actor", "purpose", "period", "class"}
    if unknown:
        raise FhirFailure(422, "not-supported", f"Consent.provision: {', '.join(sorted(unknown))} not supported "
                                                "(type, actor, purpose, period.end, class)")
    actors = provision.get("actor", [])
    if not isinstance(actors, list) or len(actors) > 1:
        raise FhirFailure(422, "not-supported", "Consent.provision.actor: one recipient per Consent (none: every "
                                                "member)")
    to = "*"
    if actors:
        reference = actors[0].get("reference") if isinstance(actors[0], dict) else None
        text = reference.get("reference") if isinstance(reference, dict) else None
        if not isinstance(text, str) or not text.startswith("Organization/") or text[13:] not in members:
            raise FhirFailure(422, "invalid", "Consent.provision.actor[0].reference must be Organization/<member> "
                                              "for a member of the consortium")
        to = text[13:]
    purposes = ["*"]
    if "purpose" in provision:
        codes = provision["purpose"]
        if not isinstance(codes, list) or not codes:
            raise FhirFailure(422, "invalid", "Consent.provision.purpose must be a list of Codings")
        purposes = []
        for coding in codes:
            code = coding.get("code") if isinstance(coding, dict) else None
            if code not in PURPOSE_BY_CODE:
                raise FhirFailure(422, "code-invalid", f"Consent.provision.purpose: {_shown(code)} is not one of "
                                                       f"{', '.join(PURPOSE_BY_CODE)}")
            purposes.append(PURPOSE_BY_CODE[code])
    scope = ["*"]
    if "class" in provision:
        classes = provision["class"]
        if not isinstance(classes, list) or not classes or not all(
                isinstance(c, dict) and isinstance(c.get("code"), str) for c in classes):
            raise FhirFailure(422, "invalid", "Consent.provision.class must be Codings of resource types")
        scope = [c["code"] for c in classes]
    params: dict[str, Any] = {"empi": identifier.get("value"), "to": to, "purposes": purposes, "scope": scope}
    period = provision.get("period")
    if period is not None:
        if not isinstance(period, dict) or set(period) - {"end"}:
            raise FhirFailure(422, "not-supported", "Consent.provision.period: only end is supported (a consent "
                                                    "takes effect when it is recorded)")
        if "end" in period:
            params["until"] = parse_end(period["end"], "Consent.provision.period.end")
            if params["until"] <= now_ms:
                raise FhirFailure(422, "business-rule", "Consent.provision.period.end is in the past")
    method = "consent.grant" if provision["type"] == "permit" else "consent.revoke"
    return method, params


def _shown(value: Any) -> str:
    return repr(value)[:80]


# --- CapabilityStatement ----------------------------------------------------------------------

def capability_statement(base: str, member: str, version: str, read_types: list[str], now_ms: int) -> dict[str, Any]:
    """Exactly what this interface implements."""
    bearer = {"text": "Authorization: Bearer <credential of a node user>"}
    empi_param = "patient.identifier=urn:ehrnode:empi|EMPI"
    searches: dict[str, dict[str, Any]] = {
        "Patient": {"type": "Patient", "operation": [{
            "name": "match", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-match"}]},
        "DocumentReference": {"type": "DocumentReference", "interaction": [{"code": "search-type"}], "searchParam": [
            {"name": "patient.identifier", "type": "token",
             "documentation": f"{empi_param}: every anchored record of the patient, consortium-wide"}]},
        "AuditEvent": {"type": "AuditEvent", "interaction": [{"code": "search-type"}], "searchParam": [
            {"name": "patient.identifier", "type": "token", "documentation": empi_param},
            {"name": "entity", "type": "token", "documentation": "a record id"}]},
        "Consent": {"type": "Consent", "interaction": [{"code": "search-type"}, {"code": "create"}], "searchParam": [
            {"name": "patient.identifier", "type": "token", "documentation": empi_param}]},
    }
    for rtype in read_types:
        entry = searches.setdefault(rtype, {"type": rtype})
        entry.setdefault("interaction", []).append({
            "code": "read", "documentation": "pulls the record from the member holding it (header X-Purpose-Of-Use, "
                                             "default TREAT), logged on chain before it is served"})
    return {
        "resourceType": "CapabilityStatement", "status": "active", "date": instant(now_ms),
        "kind": "instance", "fhirVersion": FHIR_VERSION, "format": ["application/fhir+json"],
        "software": {"name": "ehrnode", "version": version},
        "implementation": {"description": f"ehrnode member {member}", "url": base},
        "rest": [{"mode": "server",
                  "security": {"service": [bearer], "description": "Each request carries the credential of one of "
                                                                   "the node's users; roles apply as on the local "
                                                                   "API."},
                  "resource": sorted(searches.values(), key=lambda r: r["type"]),
                  "interaction": [{"code": "batch"}, {"code": "transaction"}]}],
    }
