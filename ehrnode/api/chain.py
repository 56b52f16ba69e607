"""Handlers of the chain itself: the node's status, blocks, test transactions, epoch keys and
membership."""

from __future__ import annotations

from typing import Any

import trio

from ..codec import MAX_UINT
from ..config import Address, Member
from ..errors import AdmissionError, CodecError, ConfigError, SchemaError
from ..ledger.transactions import CHANGES, Transaction
from .call import Call
from .commit import committed
from .rpc import MAX_WAIT, RpcError, hex_param, refused

MAX_BATCH = 1000
#: Notes of a batch signed and admitted before the call lets other tasks run (about 4 ms of work).
BATCH_TURN = 10


async def status(call: Call) -> Any:
    return call.node.status()


async def block_get(call: Call) -> Any:
    height = call.params.get("height")
    if height is not None and (not isinstance(height, int) or isinstance(height, bool) or height < 0):
        raise RpcError(-32602, "height must be a non-negative integer")
    if height is not None and height > MAX_UINT:
        raise RpcError(-32602, "height out of range")
    ids = call.params.get("ids", False)
    if not isinstance(ids, bool):
        raise RpcError(-32602, "ids must be true or false")
    block = call.node.block_view(height, ids_only=ids)
    if block is None:
        raise RpcError(-32000, f"no committed block at height {height}", reason="not_found")
    return block


async def blocks_subscribe(call: Call) -> Any:
    call.forward(call.node.subscribe(), "block.committed")
    return {"subscribed": "block.committed"}


async def tx_submit(call: Call) -> Any:
    note = call.params.get("note")
    if not isinstance(note, str):
        raise RpcError(-32602, "note must be a string")
    timeout = call.timeout()
    started = trio.current_time()
    try:
        await call.node.wait_room(timeout)
        timeout = max(0.001, timeout - (trio.current_time() - started))
        tx = call.node.submit_note(note, call.user.pseudonym)
    except AdmissionError as exc:
        raise refused(exc) from exc
    except CodecError as exc:
        raise RpcError(-32602, f"invalid note: {exc}", reason="invalid") from exc
    wait = bool(call.params.get("wait"))
    height = await call.node.wait_committed(tx.id, timeout) if wait else None
    if wait and height is None:
        raise RpcError(-32000, f"transaction {tx.id.hex()} not committed within {timeout} s", reason="timeout")
    return {"tx_id": tx.id.hex(), "height": height}


async def tx_submit_batch(call: Call) -> Any:
    notes = call.params.get("notes")
    if not isinstance(notes, list) or not 0 < len(notes) <= MAX_BATCH or not all(isinstance(n, str) for n in notes):
        raise RpcError(-32602, f"notes must be a list of 1..{MAX_BATCH} strings")
    tx_ids: list[str | None] = []
    errors = []
    deadline = trio.current_time() + call.timeout()
    for index, note in enumerate(notes):
        if index and index % BATCH_TURN == 0:
            await trio.sleep(0)  # let consensus run between chunks: signing a batch takes tens of ms
        try:
            # Past the node's backlog each note waits for commits; once the call's time is up the
            # rest are refused at once.
            await call.node.wait_room(max(0.0, deadline - trio.current_time()))
            tx_ids.append(call.node.submit_note(note, call.user.pseudonym).id.hex())
        except AdmissionError as exc:
            tx_ids.append(None)
            errors.append({"index": index, "reason": exc.reason})
        except CodecError:
            tx_ids.append(None)
            errors.append({"index": index, "reason": "invalid"})
    return {"tx_ids": tx_ids, "errors": errors}


async def tx_get(call: Call) -> Any:
    tx_id = call.params.get("tx_id")
    raw = hex_param(tx_id, "tx_id", 32)
    return {"tx_id": tx_id, "height": call.node.state.tx_height(raw), "pending": raw in call.node.mempool}


async def txs_wait(call: Call) -> Any:
    ids = call.params.get("tx_ids")
    if not isinstance(ids, list) or not 0 < len(ids) <= 100_000:
        raise RpcError(-32602, "tx_ids must be a list of 1..100000 transaction ids")
    raw_ids = [hex_param(i, "tx_ids[]", 32) for i in ids]
    timeout = call.timeout()
    heights: dict[str, int | None] = {}
    with trio.move_on_after(timeout):
        for tx_id, raw_id in zip(ids, raw_ids, strict=True):
            heights[tx_id] = await call.node.wait_committed(raw_id, MAX_WAIT)
    for tx_id, raw_id in zip(ids, raw_ids, strict=True):
        heights.setdefault(tx_id, call.node.state.tx_height(raw_id))
    return {"heights": heights}


async def keys_status(call: Call) -> Any:
    return call.node.epoch_view()


async def keys_rotate(call: Call) -> Any:
    try:
        tx = call.node.rotate_epoch_key(call.user.pseudonym)
    except AdmissionError as exc:
        raise refused(exc) from exc
    result = await committed(call, tx)
    return {**result, "epoch": tx.body["epoch"], "starts": result["height"] + 1}


async def consortium_members(call: Call) -> Any:
    return call.node.members_view()


async def consortium_proposals(call: Call) -> Any:
    status_ = call.params.get("status")
    if status_ not in (None, "open", "adopted", "lapsed"):
        raise RpcError(-32602, "status must be open, adopted or lapsed")
    return {"proposals": [_proposal_view(p) for p in call.node.state.governance.proposals(status=status_)]}


async def consortium_vote(call: Call) -> Any:
    try:
        tx = call.node.vote(hex_param(call.params.get("proposal"), "proposal", 32), call.user.pseudonym)
    except AdmissionError as exc:
        raise refused(exc) from exc
    return await _governed(call, tx)


async def consortium_propose(call: Call) -> Any:
    params, node = call.params, call.node
    change, name, reason = params.get("change"), params.get("name"), params.get("reason", "")
    if change not in CHANGES:
        raise RpcError(-32602, f"change must be one of {', '.join(CHANGES)}")
    if not isinstance(name, str) or not isinstance(reason, str):
        raise RpcError(-32602, "name and reason must be strings")
    member = None
    if change != "remove":
        current = node.state.membership.get(name)
        role = params.get("role", current.role if current else None)
        if role not in ("institution", "regulator"):
            raise RpcError(-32602, "role must be institution or regulator")
        try:
            member = Member(name, role, hex_param(params.get("signing_key"), "signing_key", 32),
                            hex_param(params.get("sealing_key"), "sealing_key", 32),
                            Address.parse(params.get("address", str(current.address) if current else None),
                                          "address"))
        except ConfigError as exc:
            raise RpcError(-32602, str(exc)) from exc
    try:
        tx = node.propose(change, name, reason=reason, member=member, actor=call.user.pseudonym)
    except AdmissionError as exc:
        raise refused(exc) from exc
    except SchemaError as exc:
        raise RpcError(-32602, str(exc), reason=exc.reason) from exc
    return await _governed(call, tx)


async def _governed(call: Call, tx: Transaction) -> Any:
    result = await committed(call, tx)
    view = call.node.state.governance.proposals_by_id(tx.body.get("proposal", tx.id))
    return {**result, "proposal": _proposal_view(view) if view else None}


def _proposal_view(proposal: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in proposal.items()}
