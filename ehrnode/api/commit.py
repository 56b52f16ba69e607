"""Answering a call that submits a transaction: once it is committed, with its height, or why not."""

from __future__ import annotations

from typing import Any

from ..errors import AdmissionError
from ..ledger.transactions import Transaction
from .call import Call
from .rpc import RpcError, refused


async def submit_and_wait(call: Call, kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """Sign ``body`` as a ``kind`` transaction by the caller; answer once it is committed."""
    try:
        await call.node.wait_room(call.timeout())
        tx = call.node.submit(kind, body, call.user.pseudonym)
    except AdmissionError as exc:
        raise refused(exc) from exc
    return await committed(call, tx)


async def committed(call: Call, tx: Transaction) -> dict[str, Any]:
    """Wait for ``tx``: ``{"tx_id", "height", "status"}`` once committed valid, or why not."""
    node = call.node
    height = await node.wait_committed(tx.id, call.timeout())
    status = node.state.tx_status(tx.id)
    if status is None:
        raise RpcError(-32000, f"transaction {tx.id.hex()} not committed in time", reason="timeout",
                       data={"tx_id": tx.id.hex()})
    if status != "ok":
        raise RpcError(-32000, f"{call.method} refused by the chain: {status}", reason=status.partition(":")[2])
    return {"tx_id": tx.id.hex(), "height": height, "status": status}
