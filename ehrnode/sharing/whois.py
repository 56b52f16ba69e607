"""Naming a user behind a pseudonym to another member, on chain and sealed.

Theory of operation
-------------------
The asker's node commits ``whois.request`` {institution, pseudonym, case} with
the asking user as its actor, then waits for the answer on its own chain. The
institution's node sees the request committed and decides: the asker must be
one its access policy tells (``[whois] requesters``, the regulator by
default), and the pseudonym must be one of its users. It commits
``whois.answer``: the user's name, role and status sealed to the asker's
X25519 key under the request's id, or the reason it does not. The asker opens
it with its own key. The rules the chain enforces are in
:mod:`ehrnode.ledger.whois`.

Requests left unanswered (the institution was down when they committed) are
answered when its node starts again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from .. import codec, crypto
from ..codec import as_map, as_str
from ..config import Genesis
from ..errors import AdmissionError, CodecError, CryptoError, EhrnodeError, SchemaError
from ..ledger.state import LedgerState
from ..ledger.transactions import Transaction, actor_text
from ..logs import get_logger
from ..users.store import UserStore
from .policy import AccessPolicy


class WhoisError(EhrnodeError):
    reason = "whois"


@dataclass(frozen=True)
class WhoisHooks:
    submit: Callable[[str, dict[str, Any], bytes], Transaction]  # kind, body, actor
    wait_committed: Callable[[bytes, float], Awaitable[int | None]]


class WhoisDesk:
    def __init__(self, *, name: str, genesis: Genesis, member: crypto.MemberKeys, state: LedgerState,
                 users: UserStore, policy: AccessPolicy | None, hooks: WhoisHooks) -> None:
        self.name = name
        self.genesis = genesis
        self.member = member
        self.state = state
        self.users = users
        self.policy = policy  # None: not an institution; it answers nothing
        self.hooks = hooks
        self.log = get_logger(node=name)
        self._answering: set[bytes] = set()

    # --- the institution's side ----------------------------------------------------------

    def pending(self) -> list[bytes]:
        """Requests made to this institution that it has not answered on chain."""
        if self.policy is None:
            return []
        return [r["request"] for r in self.state.whois.requests(institution=self.name, unanswered=True)]

    def answer(self, request: bytes) -> None:
        """Decide and submit the answer to one committed request made to this institution."""
        if self.policy is None or request in self._answering:
            return
        rows = self.state.whois.requests(request=request, unanswered=True)
        if not rows or rows[0]["institution"] != self.name:
            return
        row = rows[0]
        asker = self.state.membership.member(row["asker"])
        user = self.users.whois(row["pseudonym"])
        sealed = b""
        if not self.policy.tells(asker.name, asker.role):
            reason = "policy"
        elif user is None:
            reason = "not_found"
        else:
            reason = "granted"
            sealed = crypto.seal_to(asker.sealing_key, codec.encode(
                {"name": user.name, "role": user.role, "active": user.active}), request)
        try:
            tx = self.hooks.submit("whois.answer", {"epoch": 0, "request": request, "reason": reason,
                                                    "sealed": sealed}, b"")
        except (AdmissionError, SchemaError) as exc:
            self.log.error("whois.answer_failed", request=request.hex()[:16], reason=getattr(exc, "reason", "schema"))
            return
        self._answering.add(request)
        (self.log.warning if reason == "granted" else self.log.info)(
            "whois.answered", asker=asker.name, asker_user=actor_text(row["actor"]),
            pseudonym=actor_text(row["pseudonym"]), case=row["case_ref"], reason=reason, tx_id=tx.id.hex())

    # --- the asker's side ----------------------------------------------------------------

    async def ask(self, institution: str, pseudonym: bytes, case: str, *, actor: bytes,
                  timeout: float) -> dict[str, Any]:
        """Ask ``institution`` who ``pseudonym`` is; the opened answer, or WhoisError."""
        try:
            tx = self.hooks.submit("whois.request", {"epoch": 0, "institution": institution,
                                                      "pseudonym": pseudonym, "case": case}, actor)
        except (AdmissionError, SchemaError) as exc:
            raise WhoisError(f"the request cannot be submitted: {exc}",
                             reason=getattr(exc, "reason", "invalid")) from exc
        with trio.move_on_after(timeout):
            await self.hooks.wait_committed(tx.id, timeout)
            status = self.state.tx_status(tx.id)
            if status != "ok":
                raise WhoisError(f"the request was refused by the chain: {status}",
                                 reason=(status or "").partition(":")[2] or "refused")
            while True:
                rows = self.state.whois.requests(request=tx.id)
                if rows and rows[0]["answer"] is not None:
                    return self._opened(rows[0])
                await trio.sleep(0.1)
        raise WhoisError(f"{institution} did not answer within {timeout:g} s (request {tx.id.hex()} is on "
                         "chain; it is answered when its node is up)", reason="timeout")

    def _opened(self, row: dict[str, Any]) -> dict[str, Any]:
        found = {"institution": row["institution"], "pseudonym": actor_text(row["pseudonym"]),
                 "case": row["case_ref"], "request_tx": row["request"].hex(), "answer_tx": row["answer"].hex(),
                 "reason": row["reason"]}
        if row["reason"] != "granted":
            raise WhoisError(f"{row['institution']} did not name the user: {row['reason']} (request "
                             f"{row['request'].hex()}, answer {row['answer'].hex()})", reason=row["reason"])
        try:
            m = as_map(codec.decode(self.member.sealing_key.open(row["sealed"], row["request"])), "whois",
                       ("name", "role", "active"))
            if not isinstance(m["active"], bool):
                raise SchemaError("whois.active: expected true or false")
            found.update(name=as_str(m["name"], "whois.name", max_len=64),
                         role=as_str(m["role"], "whois.role", max_len=32), active=m["active"])
        except (CryptoError, CodecError) as exc:
            raise WhoisError(f"the answer does not open with this member's key: {exc}", reason="bad_answer") from exc
        return found
