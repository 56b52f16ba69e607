"""The requester's side of a pull: ask the owner, then trust nothing it did not prove.

Theory of operation
-------------------
A local client asks for a record by id and purpose. The node looks the record
up on its own copy of the chain (the anchor names the owner and holds the
commitment), signs a request and sends it to the owner over their
authenticated peer connection, then waits for the answer's parts.

What the owner sends is checked before any of it reaches the client:

1. the sealed release opens with this node's X25519 key under this request's
   id (so it was sealed for this request, to this member);
2. the access log the answer names is committed on this node's chain, granted,
   for this very request (data that moved without its log entry is dropped);
3. ``SHA-256(salt || release)`` equals the anchor's commitment. If it does not,
   the owner served something other than what it anchored: the node logs
   ``integrity.mismatch``, commits an ``integrity.alert`` naming the owner and
   the access, and the client gets an IntegrityError and no data.

A refusal is believed only as far as the chain shows it: its access log is
looked up, so the client learns the reason the owner committed to.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .. import crypto
from ..config import Genesis
from ..errors import AdmissionError, CodecError, CryptoError, IntegrityError, PullError
from ..ledger.state import LedgerState
from ..ledger.transactions import ALERTS_BY_REQUEST_SINCE, Transaction, actor_text
from ..logs import get_logger
from ..records.canonical import commitment
from .messages import PullAnswer, PullRequest, open_payload

#: After an answer arrives, how long to wait for this node to see the access log committed.
LOG_TIMEOUT = 15.0


@dataclass(frozen=True)
class RequesterHooks:
    send: Callable[[str, bytes], bool]  # a pull frame to a peer
    submit: Callable[[str, dict[str, Any], bytes], Transaction]  # kind, body, actor
    wait_committed: Callable[[bytes, float], Awaitable[int | None]]
    counters: Callable[[str], None]


@dataclass
class _Pending:
    owner: str
    done: trio.Event = field(default_factory=trio.Event)
    parts: dict[int, PullAnswer] = field(default_factory=dict)
    bad: bool = False


@dataclass(frozen=True)
class Pulled:
    record_id: bytes
    owner: str
    purpose: str
    resource: dict[str, Any]
    canonical: bytes
    salt: bytes
    commitment: bytes
    access_tx: bytes
    height: int
    emergency: bool

    def view(self) -> dict[str, Any]:
        return {
            "record_id": self.record_id.hex(), "owner": self.owner, "purpose": self.purpose,
            "resource": self.resource, "salt": self.salt.hex(), "commitment": self.commitment.hex(),
            "access_tx": self.access_tx.hex(), "height": self.height, "emergency": self.emergency, "verified": True,
        }


class Puller:
    def __init__(self, *, name: str, genesis: Genesis, member: crypto.MemberKeys, state: LedgerState,
                 hooks: RequesterHooks) -> None:
        self.name = name
        self.genesis = genesis
        self.member = member
        self.state = state
        self.hooks = hooks
        self.log = get_logger(node=name)
        self._pending: dict[bytes, _Pending] = {}

    def on_answer(self, peer: str, data: bytes) -> bool:
        """Take one answer part from ``peer``; False if it is not a valid answer to a pull of ours."""
        try:
            answer = PullAnswer.decode(data)
        except CodecError as exc:
            self.log.warning("pull.bad_answer", peer=peer, error=str(exc))
            return False
        pending = self._pending.get(answer.request)
        if pending is None or pending.owner != peer:
            return pending is None  # late (timed out) answers are harmless; another member's are not
        if pending.done.is_set():
            return False
        first = pending.parts.get(min(pending.parts)) if pending.parts else None
        # A refusal is one part; a served answer is parts 0..n-1, all alike but for their data.
        consistent = (answer.status == "served" or answer.parts == 1) and answer.part not in pending.parts and (
            first is None or (answer.parts, answer.status, answer.access) == (first.parts, first.status,
                                                                              first.access))
        if not consistent:
            self.log.warning("pull.bad_answer", peer=peer, error=f"inconsistent part {answer.part} of {answer.parts}")
            pending.parts.clear()
            pending.bad = True
            pending.done.set()
            return False
        pending.parts[answer.part] = answer
        if len(pending.parts) == answer.parts:
            pending.done.set()
        return True

    async def pull(self, record: bytes, purpose: str, timeout: float, *, user: bytes, role: str) -> Pulled:
        """Pull ``record`` for ``purpose`` on behalf of ``user`` (pseudonym) acting as ``role``."""
        anchors = self.state.anchors(record=record)
        if not anchors:
            raise PullError(f"no record {record.hex()} is anchored on the chain (as far as {self.name} has seen)",
                            reason="not_found")
        anchor = anchors[0]
        owner = anchor["institution"]
        if owner == self.name:
            raise PullError(f"record {record.hex()} is {self.name}'s own: read it with `records show`",
                            reason="own_record")
        request = PullRequest.create(chain_id=self.genesis.chain_id, requester=self.name, user=user, role=role,
                                     owner=owner, record=record, purpose=purpose,
                                     time_ms=int(time.time() * 1000), identity=self.member.identity)
        data = request.encode()
        rid = crypto.sha256(data)
        pending = self._pending[rid] = _Pending(owner)
        started = time.monotonic()
        try:
            if not self.hooks.send(owner, data):
                self.hooks.counters("failed")
                raise PullError(f"{owner} is not connected (or its queue is full): try again", reason="unreachable")
            with trio.move_on_after(timeout):
                await pending.done.wait()
            if not pending.done.is_set():
                self.hooks.counters("failed")
                raise PullError(f"{owner} did not answer within {timeout:g} s", reason="timeout")
        finally:
            self._pending.pop(rid, None)
        if pending.bad:
            self.hooks.counters("failed")
            raise PullError(f"{owner} sent an answer whose parts do not fit together", reason="bad_answer")
        first = pending.parts[0]
        fields = {"owner": owner, "record_id": record.hex(), "purpose": purpose, "request": rid.hex()[:16],
                  "user": actor_text(user)}
        if first.status != "served":
            self.hooks.counters("refused" if first.status == "refused" else "failed")
            if first.status == "refused":
                await self._check_logged(rid, first.access, "refused", fields)
            self.log.info("pull.answered", status=first.status, reason=first.reason, **fields)
            raise PullError(f"{owner} {first.status} the pull: {first.message} ({first.reason})",
                            reason=first.reason, access_tx=first.access or None)
        sealed = b"".join(pending.parts[i].data for i in range(len(pending.parts)))
        try:
            got_record, canonical, salt = open_payload(self.member.sealing_key.open(sealed, rid))
        except (CryptoError, CodecError) as exc:
            self.hooks.counters("failed")
            self.log.error("pull.bad_answer", error=str(exc), **fields)
            raise PullError(f"{owner}'s answer does not open: {exc}", reason="bad_answer") from exc
        access = await self._check_logged(rid, first.access, "granted", fields)
        received = commitment(salt, canonical)
        if got_record != record or received != anchor["commitment"]:
            await self._alarm(anchor, rid, first.access, received, fields, user)
        try:
            resource = json.loads(canonical)
        except ValueError as exc:  # matched the commitment, so the owner anchored it like this
            raise IntegrityError(f"record {record.hex()} is not JSON: {exc}", reason="not_json") from exc
        self.hooks.counters("verified")
        self.log.info("pull.verified", bytes=len(canonical), emergency=access["reason"] == "emergency_override",
                      seconds=round(time.monotonic() - started, 3), **fields)
        return Pulled(record, owner, purpose, resource, canonical, salt, received, first.access, access["height"],
                      access["reason"] == "emergency_override")

    async def _check_logged(self, rid: bytes, access_tx: bytes, decision: str,
                            fields: dict[str, Any]) -> dict[str, Any]:
        """The committed access log for ``rid`` with ``decision`` (its row); PullError if none."""
        height = await self.hooks.wait_committed(access_tx, LOG_TIMEOUT) if access_tx else None
        logged = self.state.access.accesses(request=rid)
        if height is None or not logged or logged[0]["tx_id"] != access_tx or logged[0]["decision"] != decision:
            self.hooks.counters("failed")
            self.log.error("pull.unlogged", decision=decision, access_tx=access_tx.hex(), **fields)
            raise PullError(f"the owner's answer names no committed access log {decision} for this request: "
                            "nothing is accepted", reason="unlogged")
        return logged[0]

    async def _alarm(self, anchor: dict[str, Any], rid: bytes, access_tx: bytes, received: bytes,
                     fields: dict[str, Any], user: bytes) -> None:
        self.hooks.counters("integrity")
        self.log.error("integrity.mismatch", expected=anchor["commitment"].hex(), received=received.hex(),
                       access_tx=access_tx.hex(), **fields)
        alert_id = None
        try:
            tx = self.hooks.submit("integrity.alert", {
                # The access by its request: the access log may have logged other decisions too (a
                # chain of ledger rules 1 knows only access logs of one, by their own id).
                "epoch": 0, "record": anchor["record"], "owner": anchor["institution"],
                "access": rid if self.state.rules >= ALERTS_BY_REQUEST_SINCE else access_tx,
                "received": received,
            }, user)
            alert_id = tx.id
            await self.hooks.wait_committed(tx.id, LOG_TIMEOUT)
        except AdmissionError as exc:
            self.log.error("integrity.alert_failed", reason=exc.reason, **fields)
        raise IntegrityError(
            f"{anchor['institution']} served record {anchor['record'].hex()} not as anchored: commitment "
            f"{received.hex()[:16]} != {anchor['commitment'].hex()[:16]}; nothing returned"
            + (f"; alert {alert_id.hex()} on chain" if alert_id else ""), reason="commitment_mismatch")
