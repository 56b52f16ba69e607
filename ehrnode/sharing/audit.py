"""Audit views over the chain: trails, disclosures, leak tracing, and FHIR AuditEvents.

Everything here reads the ledger state only, so any member (the regulator
included) gets the same answer from its own copy of the chain: no record
content is needed, and none is shown.

- :func:`trail`: every event of a patient (by EMPI, through merges), of one
  record, or of one user (by pseudonym), in chain order: recorded, consent
  changed, access granted or refused, erased, integrity alarm, EMPI changes.
  Each names who (the member, and its pseudonym for the user who acted),
  what, when, purpose, decision, block height and transaction id.
- :func:`disclosures`: the accounting of disclosures of one patient: every
  access granted to another institution, with recipient, purpose and date.
- :func:`trace_leak`: given a copy of a served record (its release and salt),
  the record whose commitment it matches and every member, and user there,
  it was served to.
- :func:`audit_events`: a trail as a FHIR R4 Bundle of AuditEvent resources.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ..errors import EhrnodeError
from ..ledger.state import LedgerState
from ..ledger.transactions import actor_text
from ..records.canonical import canonical_json, commitment


class AuditError(EhrnodeError):
    reason = "audit"


def _access_event(state: LedgerState, a: dict[str, Any]) -> dict[str, Any]:
    return {
        "event": "access", "who": a["requester"], "user": actor_text(a["user"]), "user_role": a["user_role"],
        "owner": a["owner"], "record_id": a["record"].hex(),
        "purpose": a["purpose"], "decision": a["decision"], "reason": a["reason"],
        "emergency": a["reason"] == "emergency_override" or a["purpose"] == "emergency",
        "consent_tx": a["consent"].hex() or None, "request": a["request"].hex(), "requested_at": a["requested_at"],
        "time": a["time"], "height": a["height"], "tx_id": a["tx_id"].hex(),
        "shared_tx": state.tx_kind(a["tx_id"]) == "access.logs",
    }


def _recorded_event(state: LedgerState, a: dict[str, Any], actor: bytes) -> dict[str, Any]:
    return {
        "event": "recorded", "who": a["institution"], "user": actor_text(actor), "owner": a["institution"],
        "record_id": a["record"].hex(), "resource_type": a["resource_type"], "setting": a["setting"],
        "empi": a["empi"], "time": a["recorded_at"], "height": a["height"], "tx_id": a["tx_id"].hex(),
        "shared_tx": state.tx_kind(a["tx_id"]) == "record.anchors",
    }


def _record_events(state: LedgerState, anchors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    records = [a["record"] for a in anchors]
    types = {a["record"]: a["resource_type"] for a in anchors}
    events = [_recorded_event(state, a, state.actor_of(a["tx_id"])) for a in anchors]
    for access in state.access.accesses(records=records):
        events.append({**_access_event(state, access), "resource_type": types.get(access["record"])})
    for e in state.access.erasures(records=records):
        events.append({
            "event": "erased", "who": e["owner"], "user": actor_text(state.actor_of(e["tx_id"])), "owner": e["owner"],
            "record_id": e["record"].hex(),
            "resource_type": types.get(e["record"]), "reason_digest": e["reason"].hex(), "time": e["time"],
            "height": e["height"], "tx_id": e["tx_id"].hex(),
        })
    for alert in state.access.alerts(records=records):
        named = state.access.named(alert["access"])
        events.append({
            "event": "integrity_alarm", "who": alert["reporter"], "user": actor_text(state.actor_of(alert["tx_id"])),
            "owner": alert["owner"],
            "record_id": alert["record"].hex(), "resource_type": types.get(alert["record"]),
            "access_tx": named["tx_id"].hex() if named else alert["access"].hex(),
            "request": named["request"].hex() if named else None,
            "received": alert["received"].hex(), "time": alert["time"],
            "height": alert["height"], "tx_id": alert["tx_id"].hex(),
        })
    return events


def _ordered(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {"recorded": 0, "consent": 1, "access": 2, "erased": 3, "integrity_alarm": 4, "action": 5, "whois": 6}
    return sorted(events, key=lambda e: (e["height"], order[e["event"]], e["time"]))


def trail(state: LedgerState, *, empi: str | None = None, record: bytes | None = None,
          user: bytes | None = None, institution: str | None = None) -> list[dict[str, Any]]:
    """Every event of one patient (``empi``), one record or one user (pseudonym, of ``institution`` if
    given), in chain order."""
    if sum(x is not None for x in (empi, record, user)) != 1:
        raise AuditError("give one of an EMPI, a record id or a user pseudonym", reason="usage")
    if user is not None:
        return _user_events(state, user, institution)
    if record is not None:
        anchors = state.anchors(record=record)
        if not anchors:
            raise AuditError(f"no record {record.hex()} is anchored on the chain", reason="not_found")
        return _ordered(_record_events(state, anchors))
    assert empi is not None
    if state.empi.resolve(None, empi) is None:
        raise AuditError(f"no EMPI {empi} on the chain", reason="not_found")
    events = _record_events(state, state.anchors(empi=empi))
    for entry in state.consent.entries(empi):
        events.append({
            "event": "consent", "action": entry["action"], "who": entry["grantor"],
            "user": actor_text(state.actor_of(bytes.fromhex(entry["tx_id"]))), "grantee": entry["grantee"],
            "purposes": entry["purposes"], "scope": entry["scope"], "until": entry["until"], "empi": entry["empi"],
            "time": entry["time"], "height": entry["height"], "tx_id": entry["tx_id"],
        })
    return _ordered(events)


def _user_events(state: LedgerState, user: bytes, institution: str | None) -> list[dict[str, Any]]:
    """Everything a user did: each transaction carrying their pseudonym, each pull they made, and each
    time someone asked who they are.

    A pseudonym is only its institution's to give: with ``institution``, transactions of other members
    that carry the same bytes (which only a member misbehaving would write) are left out.
    """
    events: list[dict[str, Any]] = []
    for action in state.actions(user):
        if institution is not None and action["submitter"] != institution:
            continue
        if action["kind"] in ("record.anchor", "record.anchors"):
            anchors = state.anchors(tx_id=action["tx_id"])
            if anchors:
                events.extend(_recorded_event(state, anchor, action["actor"]) for anchor in anchors)
                continue
        events.append({
            "event": "action", "kind": action["kind"], "who": action["submitter"], "user": actor_text(action["actor"]),
            "time": action["time"], "height": action["height"], "tx_id": action["tx_id"].hex(),
        })
    accesses = state.access.accesses(user=user, requester=institution)
    types = {}
    for record in {a["record"] for a in accesses}:
        found = state.anchors(record=record)
        types[record] = found[0]["resource_type"] if found else None
    events.extend({**_access_event(state, a), "resource_type": types.get(a["record"])} for a in accesses)
    for w in state.whois.requests(pseudonym=user, institution=institution):
        # Someone asked who this user is: the request, and the answer if there is one (not its content).
        events.append({
            "event": "whois", "who": w["asker"], "user": actor_text(w["actor"]), "institution": w["institution"],
            "case": w["case_ref"], "reason": w["reason"], "answer_tx": w["answer"].hex() if w["answer"] else None,
            "time": w["time"], "height": w["height"], "tx_id": w["request"].hex(),
        })
    if not events:
        raise AuditError(f"no transaction or pull on the chain names user {actor_text(user)}", reason="not_found")
    return _ordered(events)


def disclosures(state: LedgerState, empi: str) -> list[dict[str, Any]]:
    """Every access to the patient's records that was granted, i.e. every copy that left its owner."""
    if state.empi.resolve(None, empi) is None:
        raise AuditError(f"no EMPI {empi} on the chain", reason="not_found")
    anchors = state.anchors(empi=empi)
    types = {a["record"]: a["resource_type"] for a in anchors}
    return [{**_access_event(state, a), "resource_type": types.get(a["record"])}
            for a in state.access.accesses(records=list(types), decision="granted")]


def trace_leak(state: LedgerState, leaked: dict[str, Any]) -> dict[str, Any]:
    """Who received the record a leaked copy comes from.

    ``leaked`` is what a pull returned (``resource`` and ``salt``; ``ehrnode records pull
    --out`` writes exactly that). Its commitment is recomputed and looked up on chain, so
    the answer also proves the copy is genuine (unaltered) content of that record.
    """
    resource, salt_hex = leaked.get("resource"), leaked.get("salt")
    if not isinstance(resource, dict) or not isinstance(salt_hex, str):
        raise AuditError("the leaked copy must be a served record: a JSON object with \"resource\" and \"salt\" "
                         "(as `ehrnode records pull --out` writes it)", reason="bad_input")
    try:
        salt = bytes.fromhex(salt_hex)
        canonical = canonical_json(resource)
    except ValueError as exc:
        raise AuditError(f"the leaked copy does not parse: {exc}", reason="bad_input") from exc
    found = commitment(salt, canonical)
    anchors = state.anchors(commitment=found)
    if not anchors:
        raise AuditError(f"no anchored record has commitment {found.hex()}: the copy was altered, or is not a "
                         "record of this consortium", reason="not_found")
    anchor = anchors[0]
    served = state.access.accesses(records=[anchor["record"]], decision="granted")
    return {
        "record_id": anchor["record"].hex(), "owner": anchor["institution"], "resource_type": anchor["resource_type"],
        "commitment": found.hex(), "empi": anchor["empi"], "recorded_height": anchor["height"],
        "recipients": sorted({a["requester"] for a in served}),
        "users": sorted({f"{a['requester']}/{actor_text(a['user'])}" for a in served}),
        "served": [_access_event(state, a) for a in served],
    }


# --- FHIR --------------------------------------------------------------------------------

#: Purposes of a pull as HL7 v3 PurposeOfUse (ActReason) codes, with their display text.
PURPOSE_OF_USE = {
    "treatment": ("TREAT", "treatment"), "payment": ("HPAYMT", "healthcare payment"),
    "operations": ("HOPERAT", "healthcare operations"), "research": ("HRESCH", "healthcare research"),
    "public-health": ("PUBHLTH", "public health"), "emergency": ("ETREAT", "emergency treatment"),
}
_ACTIONS = {"recorded": ("C", "create"), "access": ("R", "read"), "erased": ("D", "delete"),
            "consent": ("U", "update"), "integrity_alarm": ("E", "execute"), "action": ("E", "execute"),
            "whois": ("R", "read")}


def _instant(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _member(name: str, requestor: bool, user: str | None = None) -> dict[str, Any]:
    agent = {"who": {"identifier": {"system": "urn:ehrnode:member", "value": name}, "display": name},
             "requestor": requestor}
    if user:
        agent["altId"] = user  # the member's pseudonym for the user who acted
    return agent


def _event_id(event: dict[str, Any]) -> str:
    """An AuditEvent's id: its transaction's id, unique in a trail but for records anchored and
    accesses logged by one ``record.anchors`` or ``access.logs`` (``shared_tx``): theirs are the
    transaction's first 32 hex digits and the record id, or the first 32 of the request id (64 in
    all). Events of the single kinds keep the ids they always had."""
    if event.get("shared_tx") and event["event"] == "recorded":
        return event["tx_id"][:32] + event["record_id"]
    if event.get("shared_tx") and event["event"] == "access":
        return event["tx_id"][:32] + event["request"][:32]
    return str(event["tx_id"][:64])


def audit_event(event: dict[str, Any], observer: str) -> dict[str, Any]:
    """One trail event as a FHIR R4 AuditEvent."""
    action, subtype = _ACTIONS[event["event"]]
    if event["event"] == "integrity_alarm":
        kind = {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110113",
                "display": "Security Alert"}
    else:
        kind = {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
                "display": "RESTful Operation"}
    refused = event.get("decision") == "refused"
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent", "id": _event_id(event),
        "type": kind,
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": subtype}],
        "action": action, "recorded": _instant(event["time"]),
        "outcome": "4" if refused else "0",
        "agent": [_member(event["who"], True, event.get("user"))],
        "source": {"observer": {"display": observer}, "site": "ehrnode consortium chain"},
        "entity": [],
    }
    if refused:
        resource["outcomeDesc"] = f"refused: {event['reason']}"
    if event["event"] == "access":
        code, display = PURPOSE_OF_USE[event["purpose"]]
        resource["purposeOfEvent"] = [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": code, "display": display}]}]
        resource["agent"].append(_member(event["owner"], False))
    if "record_id" in event:
        resource["entity"].append({
            "what": {"identifier": {"system": "urn:ehrnode:record", "value": event["record_id"]}},
            **({"name": event["resource_type"]} if event.get("resource_type") else {}),
        })
    if event.get("empi"):
        resource["entity"].append({"what": {"identifier": {"system": "urn:ehrnode:empi", "value": event["empi"]}},
                                   "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role",
                                            "code": "1", "display": "Patient"}})
    resource["entity"].append({"what": {"identifier": {"system": "urn:ehrnode:tx", "value": event["tx_id"]}},
                               "detail": [{"type": "height", "valueString": str(event["height"])}]})
    return resource


def audit_bundle(events: list[dict[str, Any]], observer: str) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "collection",
            "entry": [{"resource": audit_event(e, observer)} for e in events]}
