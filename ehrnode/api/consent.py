"""Handlers of patients' consent: recording a grant or a revocation, and showing them."""

from __future__ import annotations

from typing import Any

from ..errors import SchemaError
from ..ledger.transactions import KINDS
from .call import Call
from .commit import submit_and_wait
from .rpc import RpcError, empi_param

#: The last moment a consent may run to: 9999-12-31T23:59:59.999Z (what a date can show).
MAX_UNTIL = 253_402_300_799_999


async def consent_show(call: Call) -> Any:
    return call.node.state.consent.entries(empi_param(call.params.get("empi"), "empi"))


async def consent_change(call: Call) -> Any:
    """``consent.grant`` and ``consent.revoke``."""
    params = call.params
    until = params.get("until", 0)
    if not isinstance(until, int) or isinstance(until, bool) or not 0 <= until <= MAX_UNTIL:
        raise RpcError(-32602, "until must be a time in milliseconds, at the latest 9999-12-31 (0: no end)")
    body = {"epoch": 0, "empi": empi_param(params.get("empi"), "empi"), "grantee": params.get("to"),
            "purposes": params.get("purposes", ["*"]), "scope": params.get("scope", ["*"]), "until": until}
    try:
        KINDS[call.method](body)
    except SchemaError as exc:
        raise RpcError(-32602, str(exc)) from exc
    return await submit_and_wait(call, call.method, body)
