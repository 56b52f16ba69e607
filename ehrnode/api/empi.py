"""Handlers of the EMPI registry: lookups, the review queue, history, and curation (link, split,
not-duplicate, merge, unmerge, accept)."""

from __future__ import annotations

from typing import Any

from ..ledger.empi_registry import scoped_enrolment
from ..ledger.transactions import ENROLMENT_SIZE
from .call import Call
from .commit import submit_and_wait
from .rpc import RpcError, empi_param, hex_param


async def empi_of(call: Call) -> Any:
    patients = call.params.get("patients")
    if not isinstance(patients, list) or len(patients) > 100_000:
        raise RpcError(-32602, "patients must be a list of enrolment ids")
    registry = call.node.state.empi
    # This node's own enrolment ids, as records.add returns them.
    return {p: registry.empi_of(scoped_enrolment(call.node.name, hex_param(p, "patients[]", ENROLMENT_SIZE)))
            for p in patients}


async def empi_lookup(call: Call) -> Any:
    patient = call.params.get("patient")
    if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
        raise RpcError(-32602, "patient must be a FHIR Patient resource")
    return await call.recording().lookup(patient)


async def empi_review(call: Call) -> Any:
    return call.node.state.empi.review_queue()


async def empi_history(call: Call) -> Any:
    return call.node.state.empi.history(empi_param(call.params.get("empi"), "empi"))


async def empi_requests(call: Call) -> Any:
    return call.node.state.empi.requests(call.node.name)


def _enrolment(call: Call, name: str = "enrolment") -> bytes:
    return hex_param(call.params.get(name), name, ENROLMENT_SIZE)


async def _curate(call: Call, body: dict[str, Any]) -> Any:
    """Submit a curation and answer once committed; a link or merge held for other institutions'
    agreement says whom it waits for."""
    result = await submit_and_wait(call, call.method, body)
    held = call.node.state.empi.request(bytes.fromhex(result["tx_id"]))
    if held is not None:
        result["waiting"] = held["waiting"]
    return result


async def empi_link(call: Call) -> Any:
    return await _curate(call, {"enrolment": _enrolment(call), "empi": empi_param(call.params.get("empi"), "empi")})


async def empi_split(call: Call) -> Any:
    return await _curate(call, {"enrolment": _enrolment(call)})


async def empi_not_duplicate(call: Call) -> Any:
    return await _curate(call, {"a": _enrolment(call, "a"), "b": _enrolment(call, "b")})


async def empi_merge(call: Call) -> Any:
    return await _curate(call, {"from": empi_param(call.params.get("from"), "from"),
                                "into": empi_param(call.params.get("into"), "into")})


async def empi_unmerge(call: Call) -> Any:
    return await _curate(call, {"merge": hex_param(call.params.get("merge"), "merge", 32)})


async def empi_accept(call: Call) -> Any:
    return await _curate(call, {"request": hex_param(call.params.get("request"), "request", 32)})
