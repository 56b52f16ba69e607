"""Handlers of sharing and audit: pulling a record, the audit trail, disclosures, leak tracing,
event feeds, and naming a user behind a pseudonym."""

from __future__ import annotations

from typing import Any

from ..errors import AdmissionError, IntegrityError, PullError
from ..ledger.transactions import CONSENT_PURPOSES
from ..sharing import audit
from ..sharing.events import Subscription
from ..sharing.whois import WhoisError
from .call import Call
from .rpc import RpcError, empi_param, hex_param, pseudonym_param, refused


async def records_pull(call: Call) -> Any:
    record_id = hex_param(call.params.get("record_id"), "record_id", 16)
    purpose = call.params.get("purpose")
    if not isinstance(purpose, str) or purpose not in CONSENT_PURPOSES:
        raise RpcError(-32602, f"purpose must be one of {', '.join(CONSENT_PURPOSES)}")
    try:
        pulled = await call.node.puller.pull(record_id, purpose, call.timeout(60.0), user=call.user.pseudonym,
                                             role=call.user.role)
    except PullError as exc:
        message = str(exc) + (f" (access log {exc.access_tx.hex()})" if exc.access_tx else "")
        raise RpcError(-32000, message, reason=exc.reason,
                       data={"access_tx": exc.access_tx.hex()} if exc.access_tx else None) from exc
    except IntegrityError as exc:
        raise refused(exc) from exc
    return pulled.view()


async def audit_trail(call: Call) -> Any:
    params = call.params
    empi, record, actor = params.get("empi"), params.get("record_id"), params.get("user")
    institution = None
    if isinstance(actor, str) and "/" in actor:
        institution, _, actor = actor.partition("/")
    try:
        events = audit.trail(call.node.state, empi=empi_param(empi, "empi") if empi is not None else None,
                             record=hex_param(record, "record_id", 16) if record is not None else None,
                             user=pseudonym_param(actor) if actor is not None else None, institution=institution)
    except audit.AuditError as exc:
        raise refused(exc) from exc
    return audit.audit_bundle(events, call.node.name) if params.get("fhir") is True else events


async def audit_disclosures(call: Call) -> Any:
    try:
        return audit.disclosures(call.node.state, empi_param(call.params.get("empi"), "empi"))
    except audit.AuditError as exc:
        raise refused(exc) from exc


async def audit_trace(call: Call) -> Any:
    leaked = call.params.get("leaked")
    if not isinstance(leaked, dict):
        raise RpcError(-32602, "leaked must be the served record: {resource, salt, ...}")
    try:
        return audit.trace_leak(call.node.state, leaked)
    except audit.AuditError as exc:
        raise refused(exc) from exc


async def events_subscribe(call: Call) -> Any:
    empis = call.params.get("empis", [])
    if not isinstance(empis, list) or len(empis) > 1000:
        raise RpcError(-32602, "empis must be a list of at most 1000 EMPIs")
    own = call.params.get("own", not empis)
    if not isinstance(own, bool):
        raise RpcError(-32602, "own must be true or false")
    subscription = Subscription(frozenset(empi_param(e, "empis[]") for e in empis), own)
    try:
        channel = call.node.subscribe_events(subscription)
    except AdmissionError as exc:
        raise refused(exc) from exc
    call.forward(channel, "event")
    return {"subscribed": "event", "empis": sorted(subscription.empis), "own": own}


async def audit_whois(call: Call) -> Any:
    """Who a pseudonym of this institution is; with ``at``, ask that institution on chain."""
    if call.params.get("at") not in (None, call.node.name):
        return await _whois_elsewhere(call)
    pseudonym = pseudonym_param(call.params.get("pseudonym"))
    found = call.api.users.whois(pseudonym)
    call.api.log.info("audit.whois", user=call.user.name, pseudonym=call.params["pseudonym"], found=found is not None)
    if found is None:
        raise RpcError(-32000, f"{call.params['pseudonym']} is not a user of {call.node.name}", reason="not_found")
    return {k: v for k, v in found.view().items() if k != "empi" or v is not None}


async def _whois_elsewhere(call: Call) -> Any:
    """Ask another institution, on chain, who one of its pseudonyms is (the answer is sealed to us)."""
    at, case = call.params.get("at"), call.params.get("case")
    if not isinstance(at, str) or at not in {m.name for m in call.node.genesis.members}:
        raise RpcError(-32602, "at must be a member of the consortium")
    if not isinstance(case, str) or not case.strip() or len(case) > 128:
        raise RpcError(-32602, "case must name what the request is for (at most 128 characters)")
    pseudonym = pseudonym_param(call.params.get("pseudonym"))
    call.api.log.info("audit.whois_asked", user=call.user.name, at=at, pseudonym=call.params["pseudonym"], case=case)
    try:
        return await call.node.whois.ask(at, pseudonym, case.strip(), actor=call.user.pseudonym,
                                         timeout=call.timeout())
    except WhoisError as exc:
        raise refused(exc) from exc
