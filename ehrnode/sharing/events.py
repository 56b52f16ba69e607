"""Events for subscribers: what a committed transaction means to a patient's institutions.

Each committed transaction of a sharing kind becomes one event (a
``record.anchors`` one per record it anchors, an ``access.logs`` one per
decision), with the
patient's EMPI (as it stands when the block is applied) and the set of
institutions it concerns. A subscriber asks for events of given EMPIs, or for
its own (``own``): new records and consent changes of patients it has
enrolled, and accesses, erasures and integrity alarms of records it owns.

``record.new``       a record of the patient was anchored (by any institution)
``record.accessed``  an owner decided a pull: requester, purpose, decision, reason,
                     ``emergency`` when consent was overridden
``consent.changed``  a grant or revocation was recorded
``record.erased``    an owner erased a record
``integrity.alarm``  a requester found a served record not matching its anchor
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..ledger.empi_registry import scoped_enrolment
from ..ledger.requests import PullRequest
from ..ledger.state import LedgerState
from ..ledger.transactions import Transaction, anchors_of, decisions_of


@dataclass(frozen=True)
class Event:
    body: dict[str, Any]
    empi: str | None
    concerns: frozenset[str]  # institutions for which this is one of "their own" events


def _record(state: LedgerState, record: bytes) -> tuple[str | None, str | None, str | None]:
    """(EMPI, owner, resource type) of an anchored record."""
    anchors = state.anchors(record=record)
    if not anchors:
        return None, None, None
    return anchors[0]["empi"], anchors[0]["institution"], anchors[0]["resource_type"]


def events_of(state: LedgerState, tx: Transaction, height: int) -> list[Event]:
    """The events a committed, valid transaction stands for (none: not a sharing event)."""
    common = {"height": height, "tx_id": tx.id.hex(), "time": tx.time}
    if tx.kind in ("record.anchor", "record.anchors"):
        events = []
        for anchor in anchors_of(tx):
            empi = state.empi.empi_of(scoped_enrolment(anchor["institution"], anchor["patient"]))
            concerns = state.empi.institutions_of(empi) if empi else set()
            events.append(Event({"event": "record.new", "empi": empi, "record_id": anchor["record"].hex(),
                                 "institution": anchor["institution"], "resource_type": anchor["resource_type"],
                                 "setting": anchor["setting"], **common},
                                empi, frozenset(concerns | {anchor["institution"]})))
        return events
    if tx.kind in ("access.log", "access.logs"):
        events = []
        for decision in decisions_of(tx):
            request = PullRequest.decode(decision["request"])
            empi, owner, resource_type = _record(state, request.record)
            events.append(Event({
                "event": "record.accessed", "empi": empi, "record_id": request.record.hex(),
                "owner": tx.submitter, "requester": request.requester, "purpose": request.purpose,
                "resource_type": resource_type, "decision": decision["decision"], "reason": decision["reason"],
                "emergency": decision["reason"] == "emergency_override", **common}, empi, frozenset({tx.submitter})))
        return events
    event = _event_of(state, tx, common)
    return [] if event is None else [event]


def _event_of(state: LedgerState, tx: Transaction, common: dict[str, Any]) -> Event | None:
    body = tx.body
    if tx.kind in ("consent.grant", "consent.revoke"):
        empi = body["empi"]
        return Event({"event": "consent.changed", "empi": empi, "action": tx.kind.partition(".")[2],
                      "grantor": tx.submitter, "grantee": body["grantee"], "purposes": body["purposes"],
                      "scope": body["scope"], "until": body["until"] or None, **common},
                     empi, frozenset(state.empi.institutions_of(empi)))
    if tx.kind == "record.erase":
        empi, owner, resource_type = _record(state, body["record"])
        return Event({"event": "record.erased", "empi": empi, "record_id": body["record"].hex(),
                      "owner": tx.submitter, "resource_type": resource_type, **common}, empi,
                     frozenset({tx.submitter}))
    if tx.kind == "integrity.alert":
        empi, owner, resource_type = _record(state, body["record"])
        access = state.access.named(body["access"])
        return Event({"event": "integrity.alarm", "empi": empi, "record_id": body["record"].hex(),
                      "owner": body["owner"], "reporter": tx.submitter, "resource_type": resource_type,
                      "access_tx": access["tx_id"].hex() if access else body["access"].hex(),
                      "request": access["request"].hex() if access else None, **common}, empi,
                     frozenset({body["owner"], tx.submitter}))
    return None


@dataclass
class Subscription:
    empis: frozenset[str]
    own: bool

    def wants(self, me: str, event: Event, aliases: frozenset[str]) -> bool:
        """``aliases``: the event's EMPI as it stands now and every EMPI merged into it."""
        return (self.own and me in event.concerns) or bool(self.empis & aliases)
