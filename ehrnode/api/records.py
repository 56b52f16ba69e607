"""Handlers of this institution's records: staging and recording FHIR input, listing anchors,
showing a record, k-anonymity, verifying the vault."""

from __future__ import annotations

from typing import Any

import trio

from ..errors import AdmissionError, EhrnodeError, FhirError, IntegrityError
from ..ledger.empi_registry import scoped_enrolment
from ..records import fhir
from ..records.workers import Checked
from .call import MAX_CHECKING_AHEAD, MAX_STAGED, MAX_STAGED_BYTES, MAX_STAGED_TOTAL, Call, StagedCheck
from .rpc import MAX_WAIT, RpcError, hex_param, refused


async def records_list(call: Call) -> Any:
    empi = call.params.get("empi")
    if not isinstance(empi, str) or not 0 < len(empi) <= 64:
        raise RpcError(-32602, "empi must be a non-empty string")
    return call.node.records_list(empi)


async def records_stage(call: Call) -> Any:
    staged = call.session.staged
    start = len(staged.items)
    size = _stage(call)
    if len(staged.items) > start:
        _check_ahead(call, start, size)
        _evaluate_ahead(call, start)
    return {"staged": len(staged.items)}


def _evaluate_ahead(call: Call, start: int) -> None:
    """Ask for the OPRF outputs the Patients of the part just staged need, while the caller sends
    the rest (``records.add`` then finds them cached, or waits for them rather than asking again).
    One task a connection asks, as the caller (the batch is logged on chain as theirs), for the
    Patients staged so far, then for those staged meanwhile; dropping the input cancels it, and
    ``records.add`` taking it leaves the rest to ``records.add``."""
    staged, records, actor = call.session.staged, call.recording(), call.user.pseudonym
    staged.to_evaluate.extend(item for item in staged.items[start:] if item.resource.get("resourceType") == "Patient")
    if not staged.to_evaluate or staged.evaluation is not None:
        return
    scope = staged.evaluation = trio.CancelScope()

    async def run() -> None:
        try:
            with scope:
                while staged.to_evaluate:
                    patients, staged.to_evaluate = staged.to_evaluate, []
                    await records.evaluate_ahead(patients, actor)
        finally:
            if staged.evaluation is scope:
                staged.evaluation = None

    call.session.nursery.start_soon(run)


def _check_ahead(call: Call, start: int, size: int) -> None:
    """Validate the part just staged (from ``start``; ``size``, parsed) in the worker processes
    while the caller sends the next one: ``records.add`` then validates only what no staged part
    covered. Only parts that follow on from the first item are, and only while what validation
    ahead holds over all connections (the parts being validated, then their results until they
    are taken or dropped) stays within ``MAX_CHECKING_AHEAD``. A part too small for the workers
    is not: validating it here would only compete with the event loop. The parts of one input
    begin in the order staged, two at most at once (the others' inputs get their turns too),
    and none after one that failed."""
    staged, api, records = call.session.staged, call.api, call.recording()
    items = staged.items[start:]
    if (staged.checked_to != start or not records.checks_ahead(len(items))
            or api.checking_ahead + size > MAX_CHECKING_AHEAD):
        staged.checked_to = -1
        return
    before = staged.checks[-2:]
    check = StagedCheck(start, items, size, previous=before[-1] if before else None,
                        after=before[0] if len(before) == 2 else None)

    async def run() -> None:
        try:
            with check.scope:
                if check.previous is not None:
                    await check.previous.began.wait()
                    if check.previous.done.is_set() and check.previous.results is None:
                        return  # it failed (or was cancelled): records.add validates from there on
                if check.after is not None:
                    await check.after.done.wait()
                    if check.after.results is None:
                        return  # it failed (or was cancelled): records.add validates from there on
                check.results = await records.check(items, check.began.set)
        except Exception as exc:  # noqa: BLE001 - records.add validates these items itself, and says why
            api.log.warning("records.check_failed", resources=len(items), error=repr(exc))
            if not check.dropped:
                staged.checked_to = -1  # no later part of this input is validated ahead
        finally:
            api.checking_ahead -= size
            if check.results is not None and not check.dropped:
                # Held until records.add takes them or the input is dropped (ApiState.release).
                check.held = sum(len(r) for r in check.results if isinstance(r, bytes))
                api.checking_ahead += check.held
            check.previous = check.after = None
            check.began.set()
            check.done.set()

    call.session.nursery.start_soon(run)
    staged.checks.append(check)
    staged.checked_to = start + len(items)
    api.checking_ahead += size


async def _checked_ahead(checks: list[StagedCheck], batch: list[fhir.Item]) -> list[Checked]:
    """What the staged parts validated ahead found for the first items of ``batch``, up to the
    first part that was not (each waited for). A part's results count only for the very items it
    validated, at the places they hold in ``batch``."""
    checked: list[Checked] = []
    for check in checks:
        if check.start != len(checked):
            break
        await check.done.wait()
        results, items = check.results, check.items
        if (results is None or len(results) != len(items) or check.start + len(items) > len(batch)
                or any(batch[check.start + i] is not item for i, item in enumerate(items))):
            break
        checked.extend(results)
    return checked


async def records_add(call: Call) -> Any:
    records = call.recording()
    try:
        # Before anything is staged or written: refused, the caller still holds all of its input.
        await call.node.wait_room(call.timeout(60.0))
    except AdmissionError as exc:
        raise refused(exc) from exc
    _stage(call)
    staged = call.session.staged
    # Parts still waiting for their turn are validated with the rest rather than waited for.
    staged.cancel_checks(started=False)
    batch, checks = list(staged.items), list(staged.checks)
    call.api.release(staged, cancel_checks=False)
    if not batch:
        raise RpcError(-32602, "nothing to record: no items given or staged")

    async def ahead() -> list[Checked]:
        nonlocal checks
        found = await _checked_ahead(checks, batch)
        checks = []  # the results not taken, and the items, are not held through the recording
        return found

    try:
        outcome = await records.record(batch, skip_invalid=call.params.get("skip_invalid") is True,
                                       actor=call.user.pseudonym, ahead=ahead)
    except FhirError as exc:
        call.api.log.info("records.refused", reason=exc.reason, resources=len(batch))
        raise refused(exc) from exc
    except EhrnodeError as exc:
        # Disk full, a vault behind the chain, ...: the caller hears why; nothing was written.
        call.api.log.error("records.failed", reason=exc.reason, error=str(exc))
        raise refused(exc) from exc
    rows = [r.view() for r in outcome.records]
    if call.params.get("wait") is True:
        # Answer once the anchors are committed (each row gets its height, null if not in time),
        # so the patients' EMPIs are known.
        heights: dict[str, int | None] = {}
        with trio.move_on_after(call.timeout(60.0)):
            for tx_id in dict.fromkeys(row["tx_id"] for row in rows if row["tx_id"]):
                heights[tx_id] = await call.node.wait_committed(bytes.fromhex(tx_id), MAX_WAIT)
        for row in rows:
            if row["tx_id"]:
                row["height"] = heights.get(row["tx_id"]) or call.node.state.tx_height(bytes.fromhex(row["tx_id"]))
    empis: dict[str, str | None] = {}  # one lookup a patient, not one a record
    for row in rows:
        patient = row["patient"]
        if patient not in empis:
            empis[patient] = call.node.state.empi.empi_of(scoped_enrolment(call.node.name, bytes.fromhex(patient)))
        row["empi"] = empis[patient]
    return {"records": rows, "skipped": outcome.skipped}


def _stage(call: Call) -> int:
    """Hold the call's items on the connection, within the limits on staged input; returns their
    parsed size."""
    items = call.params.get("items", [])
    if not isinstance(items, list):
        raise RpcError(-32602, "items must be a list of {source, resource}")
    for index, entry in enumerate(items):
        if not (isinstance(entry, dict) and isinstance(entry.get("source"), str)
                and isinstance(entry.get("resource"), dict)):
            raise RpcError(-32602, f"items[{index}] must be {{source: string, resource: object}}")
    staged, api = call.session.staged, call.api
    size = staged.message_bytes if items else 0
    if (len(staged.items) + len(items) > MAX_STAGED or staged.bytes + size > MAX_STAGED_BYTES
            or api.staged_total + size > MAX_STAGED_TOTAL):
        call.node.refusals.refuse("api_staged", call.user.name, trio.current_time(),
                                  detail=f"{len(staged.items) + len(items)} resources, "
                                         f"{(staged.bytes + size) >> 20} MiB parsed")
        api.release(staged)
        raise RpcError(-32000, f"input too large to record at once (at most {MAX_STAGED} resources, "
                               f"{MAX_STAGED_BYTES >> 20} MiB per input once parsed, {MAX_STAGED_TOTAL >> 20} MiB "
                               "staged on this node); staged input dropped; record it in parts", reason="too_large")
    staged.items.extend(fhir.Item(entry["source"], entry["resource"]) for entry in items)
    staged.bytes += size
    api.staged_total += size
    return size


async def records_show(call: Call) -> Any:
    record_id = hex_param(call.params.get("record_id"), "record_id", 16)
    try:
        return await call.recording().show(record_id)
    except KeyError as exc:
        raise RpcError(-32000, f"no record {record_id.hex()} in this institution's vault", reason="not_found") from exc
    except IntegrityError as exc:
        raise refused(exc) from exc


async def records_kanon(call: Call) -> Any:
    return await call.recording().kanon_report()


async def vault_verify(call: Call) -> Any:
    try:
        return await call.recording().verify(decrypt=call.params.get("decrypt", True) is not False)
    except EhrnodeError as exc:
        raise refused(exc) from exc


async def records_erase(call: Call) -> Any:
    record_id = hex_param(call.params.get("record_id"), "record_id", 16)
    reason = call.params.get("reason")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > 2000:
        raise RpcError(-32602, "reason must be a non-empty text of at most 2000 characters")
    try:
        tx = await call.recording().erase(record_id, reason.strip(), call.user.pseudonym)
    except KeyError as exc:
        raise RpcError(-32000, f"no record {record_id.hex()} in this institution's vault", reason="not_found") from exc
    except EhrnodeError as exc:
        raise refused(exc) from exc
    height = await call.node.wait_committed(tx.id, call.timeout())
    return {"tx_id": tx.id.hex(), "height": height, "status": call.node.state.tx_status(tx.id) or "pending"}
