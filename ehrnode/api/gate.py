"""The door both local interfaces go through: who the caller is, and whether their role allows a
call, decided once for the JSON-RPC API and the FHIR REST interface alike.

A credential comes as ``Authorization: Bearer <credential>`` (and optionally ``X-Ehrnode-User:
<name>``); a wrong one is answered late, a few at a time over the whole node, so guessing in
parallel gains nothing (:mod:`ehrnode.users.auth`). A call is allowed by the caller's role for
the method's name in the method table (:mod:`.methods`); a patient-role user's call must name
their own EMPI. :meth:`Gate.invoke` is the one way a call reaches a handler.
"""

from __future__ import annotations

from typing import Any

import trio

from ..ledger.transactions import EMPI_PATTERN
from ..users.auth import (
    FAILURE_SLOTS,
    FREE_FAILURES,
    MAX_DELAY,
    MAX_WAITING_FAILURES,
    Outcome,
    Throttle,
    authenticate,
    bearer,
    claimed_key,
)
from ..users.store import User
from .call import ApiState, Call, Session
from .methods import ALWAYS, BY_NAME, Method
from .rpc import Disconnect, RpcError


class Gate:
    """Authentication and permission for the local interfaces of one node."""

    def __init__(self, state: ApiState) -> None:
        self.state = state
        self.throttle = Throttle()
        self._failing = trio.CapacityLimiter(FAILURE_SLOTS)
        self._throttle_logged: dict[str, float] = {}

    # --- who is calling -------------------------------------------------------------------

    def authenticate(self, headers: list[tuple[bytes, bytes]]) -> tuple[Outcome, str | None]:
        """The outcome of the credential in ``headers``, and the user name claimed (if any).
        A refusal is logged (``auth.denied``) and counted here."""
        token, claimed = bearer(headers)
        outcome = authenticate(self.state.users, self.throttle, token, claimed, trio.current_time())
        if outcome.user is None:
            self._denied(outcome, claimed)
        return outcome, claimed

    async def hold_refusal(self, outcome: Outcome) -> bool:
        """Wait out a refused credential's delay, a few refusals at a time over the whole node;
        False when too many are waiting already (refuse at once, holding nothing)."""
        if self._failing.statistics().tasks_waiting >= MAX_WAITING_FAILURES:
            return False
        with trio.move_on_after(MAX_DELAY + 10):
            async with self._failing:
                await trio.sleep(outcome.delay)
        return True

    def _denied(self, outcome: Outcome, claimed: str | None) -> None:
        node = self.state.node
        node.m_auth_denied.inc()
        key = claimed_key(claimed)
        if outcome.failures > FREE_FAILURES:
            # A flood against one name is logged once a second, with its count, not once per attempt.
            now = trio.current_time()
            if now - self._throttle_logged.get(key, -1e9) < 1.0:
                return
            if len(self._throttle_logged) > 10_000:
                self._throttle_logged.clear()
            self._throttle_logged[key] = now
        self.state.log.warning("auth.denied", reason=outcome.reason, user=key if claimed is not None else None,
                               failures=outcome.failures, throttled=outcome.status == 429, detail=outcome.message)

    # --- what they may do -----------------------------------------------------------------

    async def invoke(self, session: Session, name: str, params: dict[str, Any]) -> Any:
        """Carry out the call ``name(params)`` for ``session``'s user, if their role allows it;
        RpcError if the method is unknown, refused or fails."""
        method = BY_NAME.get(name)
        if method is None:
            raise RpcError(-32601, f"unknown method {name!r}")
        user = self.permit(session, method, params)
        call = Call(method.name, params, user, session, self.state)
        if method.institution:
            call.recording()  # refused here on a node that does not record, whatever the params
        return await method.handler(call)

    def permit(self, session: Session, method: Method, params: dict[str, Any]) -> User:
        """The caller, if still active with the same credential and allowed this call; RpcError if not."""
        name = method.name
        node = self.state.node
        user = self.state.users.get(session.name)
        if user is None or not user.active or user.secret != session.user.secret:
            why = "revoked" if user is None or not user.active else "credential_rotated"
            node.m_auth_denied.inc()
            self.state.log.warning("auth.denied", reason=why, user=session.name, method=name)
            raise Disconnect(-32000, f"user {session.name}: {why.replace('_', ' ')}; reconnect with a valid "
                                     "credential", reason=why)
        if name in ALWAYS:
            return user
        role = self.state.roles.get(user.role)
        purpose = scope_of(name, params)
        problem = None
        if role is None:
            problem = f"role {user.role} is not in {self.state.roles.source}"
        elif not role.permits(name, purpose):
            problem = f"user {user.name} (role {user.role}) may not call {name}" + (
                f" for {purpose}" if purpose is not None else "")
        elif role.patient:
            problem = self._patient_problem(user, method, params)
        if problem is not None:
            node.m_auth_denied.inc()
            self.state.log.warning("auth.denied", reason="forbidden", user=user.name, role=user.role, method=name,
                                   detail=problem)
            raise RpcError(-32000, problem, reason="forbidden")
        return user

    def _patient_problem(self, user: User, method: Method, params: dict[str, Any]) -> str | None:
        """Why a patient's call does not stay within their own EMPI (None: it does)."""
        if not method.patient:
            return f"user {user.name} is a patient: {method.name} does not name the patient"
        if method.name == "audit.trail" and (params.get("record_id") is not None or params.get("user") is not None):
            return f"user {user.name} is a patient: ask for the trail by their own EMPI"
        empi = params.get("empi")
        if not isinstance(empi, str) or user.empi is None:
            return f"user {user.name} is a patient: name their own EMPI"
        if empi == user.empi:
            return None
        registry = self.state.node.state.empi
        current = registry.resolve(None, empi) if EMPI_PATTERN.match(empi) else None
        if current is not None and current == registry.resolve(None, user.empi):
            return None
        return f"user {user.name} is a patient: {empi} is not their EMPI"


def scope_of(name: str, params: dict[str, Any]) -> str | None:
    """What a scoped permission must name for this call: a pull's purpose, the audit trail's key."""
    if name == "records.pull":
        purpose = params.get("purpose")
        return purpose if isinstance(purpose, str) else None
    if name == "audit.trail":
        return ("user" if params.get("user") is not None else "record" if params.get("record_id") is not None
                else "patient")
    return None
