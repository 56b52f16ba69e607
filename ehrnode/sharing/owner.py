"""The owner's side of a pull: check the request, decide, commit the decision, then serve.

Theory of operation
-------------------
A pull request arrives on an authenticated peer connection. The owner first
checks that the request is authentic and new; a request that is not gets a
``rejected`` answer and a ``pull.rejected`` log line, and nothing goes on
chain (nobody provably asked):

- it decodes, names this chain and this node as owner, and names as requester
  the member whose connection carried it;
- the requester's signature verifies under its signing key (as the membership lists it now);
- its time is within ``max_age_seconds`` of the owner's clock, either way;
- its id was never decided before (in memory for requests in flight, on
  chain for requests decided), so a replayed request is refused.

An authentic request is then decided (:meth:`AccessPolicy.decide`): the record
must be anchored by this node and still have its data keys, the policy must
cover requester, purpose and resource type, and the patient's consent (or
the default, or an emergency override) must allow it. The decision, granted
or refused, goes on chain in an ``access.logs`` transaction (with the other
decisions made at about the same time: :mod:`.decisions`) and the owner
**waits until it is committed** before answering: data never moves without
its log entry, and a refusal is as visible as a grant. If the log does not
commit in time the requester gets ``unavailable`` and nothing else.

A granted release is read from the vault, sealed to the requester's X25519
key the membership lists (bound to the request id) and sent in parts on the bulk
queue, so a large record never delays consensus traffic.

One member cannot crowd out the others or write to the chain without bound:
it holds at most ``MAX_IN_FLIGHT_PER_MEMBER`` of the ``MAX_IN_FLIGHT`` pull
slots, and the refusals its requests cause to be logged on chain are limited to
``REFUSAL_LOGS_PER_MINUTE`` (burst ``REFUSAL_LOGS_BURST``); past that, a request
that would be refused is answered ``rejected`` (``rate_limited``) with nothing
on chain, counted, and logged once a minute. Grants are never limited: a
request that is allowed is always logged and served.
"""

from __future__ import annotations

import sqlite3
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .. import crypto
from ..config import Genesis
from ..errors import AdmissionError, CodecError, EhrnodeError
from ..ledger.consent import Decision
from ..ledger.state import LedgerState
from ..ledger.transactions import SINCE_RULES, Transaction, actor_text, decisions_of
from ..limits import Holdings, Quota, Refusals
from ..logs import get_logger
from ..records.service import RecordsService
from .decisions import Deciding, DecisionBatcher
from .messages import PullAnswer, PullRequest, release_payload, request_id, split_served
from .policy import AccessPolicy

#: How long the owner waits for its access log to commit before answering ``unavailable``.
COMMIT_TIMEOUT = 30.0
#: Pulls being decided or served at once; more are rejected as ``busy``.
MAX_IN_FLIGHT = 512
#: Of those, pulls of one requesting member.
MAX_IN_FLIGHT_PER_MEMBER = 128
#: Refusals one member's requests may cause to be logged on chain, a minute and at once.
REFUSAL_LOGS_PER_MINUTE = 120
REFUSAL_LOGS_BURST = 240
#: Sealed releases held while their access logs commit; past this, new pulls are rejected as ``busy``.
MAX_HELD_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class OwnerHooks:
    submit: Callable[[str, dict[str, Any]], Transaction]  # sign, admit and gossip; raises AdmissionError
    #: The status of a transaction once in a committed block (``ok``, ``invalid:...``), or None
    #: if not within the time given.
    wait_applied: Callable[[bytes, float], Awaitable[str | None]]
    send: Callable[[str, bytes], bool]  # an answer frame to a peer (bulk queue)
    counters: Callable[[str], None]  # count one pull outcome (served, refused, rejected, unavailable)


class PullServer:
    def __init__(self, *, name: str, genesis: Genesis, state: LedgerState, records: RecordsService,
                 policy: AccessPolicy, hooks: OwnerHooks, refusals: Refusals | None = None) -> None:
        self.name = name
        self.genesis = genesis
        self.state = state
        self.records = records
        self.policy = policy
        self.hooks = hooks
        self.log = get_logger(node=name)
        self.in_flight = 0
        self._in_flight_by = Holdings()  # requesting member -> its pulls in flight
        self.held_bytes = 0
        self.refusals = refusals or Refusals(name)
        self._refusal_logs = Quota(REFUSAL_LOGS_PER_MINUTE, REFUSAL_LOGS_BURST)
        # Requests seen recently, whether decided yet or not: id -> time seen (ms).
        self._seen: OrderedDict[bytes, int] = OrderedDict()
        self.decisions = DecisionBatcher(hooks.submit, batched=state.rules >= SINCE_RULES["access.logs"])

    def take_slot(self, peer: str) -> str | None:
        """Take a slot for a pull from ``peer`` as it arrives, for :meth:`handle` to give back; or
        the limit it meets: all of its share taken (``pull_slots_member``), or all of them
        (``pull_slots``).

        Taken when the frame is read, not when its task starts: frames read in one go would
        otherwise all find the slots their tasks had not taken yet.
        """
        if self._in_flight_by.of(peer) >= MAX_IN_FLIGHT_PER_MEMBER:
            return "pull_slots_member"
        if self.in_flight >= MAX_IN_FLIGHT:
            return "pull_slots"
        self.in_flight += 1
        self._in_flight_by.take(peer)
        return None

    async def handle(self, peer: str, data: bytes) -> None:
        """Answer one pull request from ``peer``, in the slot :meth:`take_slot` gave it (never
        raises for anything the request does)."""
        rid = request_id(data)
        try:
            answers = await self._answer(peer, rid, data)
            for answer in answers:
                if not self.hooks.send(peer, answer.encode()):
                    # The link dropped, or the peer stopped reading: its queue is full.
                    self.log.warning("pull.undelivered", peer=peer, request=rid.hex()[:16], status=answer.status)
                    break
        except Exception as exc:  # noqa: BLE001 - the vault or the disk failed under us: say so, stay up
            reason = exc.reason if isinstance(exc, EhrnodeError) else type(exc).__name__
            self.log.error("pull.failed", peer=peer, request=rid.hex()[:16], reason=reason, error=repr(exc))
            self.hooks.counters("unavailable")
            self.hooks.send(peer, PullAnswer(rid, "unavailable", "internal", "the owner could not serve this "
                                             "record now").encode())
        finally:
            self.in_flight -= 1
            self._in_flight_by.release(peer)

    def reject_busy(self, peer: str, data: bytes, limit: str) -> None:
        """Refuse a pull that met ``limit`` (what :meth:`take_slot` said)."""
        self.hooks.counters("rejected")
        if limit == "pull_slots_member":
            message = f"{peer} has {self._in_flight_by.of(peer)} pulls in flight at {self.name}; try again"
        else:
            message = f"{self.name} is serving {MAX_IN_FLIGHT} pulls; try again"
        self.refusals.refuse(limit, peer, time.monotonic(), detail=message)
        self.hooks.send(peer, PullAnswer(request_id(data), "rejected", "busy", message).encode())

    def _reject(self, peer: str, rid: bytes, reason: str, message: str) -> list[PullAnswer]:
        self.hooks.counters("rejected")
        self.log.warning("pull.rejected", peer=peer, request=rid.hex()[:16], reason=reason, error=message)
        return [PullAnswer(rid, "rejected", reason, message)]

    def _authentic(self, peer: str, rid: bytes, data: bytes, now: int) -> PullRequest | list[PullAnswer]:
        try:
            request = PullRequest.decode(data)
        except CodecError as exc:
            return self._reject(peer, rid, "malformed", f"malformed pull request: {exc}")
        if request.chain_id != self.genesis.chain_id:
            return self._reject(peer, rid, "wrong_chain", f"request for chain {request.chain_id!r}")
        if request.requester != peer:
            # Connections are authenticated: a member cannot ask in another's name.
            return self._reject(peer, rid, "unknown_requester",
                                f"request signed for {request.requester!r} arrived from {peer!r}")
        if request.owner != self.name:
            return self._reject(peer, rid, "wrong_owner", f"request addressed to {request.owner!r}")
        if not request.signature_ok(self.state.membership.member(peer).signing_key):
            return self._reject(peer, rid, "bad_signature", "the request's signature does not verify")
        if abs(now - request.time) > self.policy.max_age_ms:
            return self._reject(peer, rid, "stale", f"request time is {abs(now - request.time) // 1000} s from the "
                                f"owner's clock (at most {self.policy.max_age_ms // 1000} s)")
        self._forget(now)
        if rid in self._seen or self.state.access.accesses(request=rid):
            return self._reject(peer, rid, "replayed", "this request was already decided")
        self._seen[rid] = now
        return request

    def _forget(self, now: int) -> None:
        # A request older than the age window is refused as stale anyway; decided ones are on chain.
        horizon = now - 2 * self.policy.max_age_ms
        while self._seen and next(iter(self._seen.values())) < horizon:
            self._seen.popitem(last=False)

    async def _answer(self, peer: str, rid: bytes, data: bytes) -> list[PullAnswer]:
        now = int(time.time() * 1000)
        request = self._authentic(peer, rid, data, now)
        if isinstance(request, list):
            return request
        with self.decisions.deciding() as pull:
            return await self._decide_and_answer(peer, rid, data, request, now, pull)

    async def _decide_and_answer(self, peer: str, rid: bytes, data: bytes, request: PullRequest, now: int,
                                 pull: Deciding) -> list[PullAnswer]:
        started = time.monotonic()
        reason, consent, resource_type = await self._decide(request, now)
        if reason not in ("granted", "emergency_override") and not self._refusal_logs.take(peer, started):
            self._seen.pop(rid, None)  # nothing decided on chain: the same request may come again later
            self.hooks.counters("rejected")
            self.refusals.refuse("refusal_logs", peer, started, detail=f"more than {REFUSAL_LOGS_PER_MINUTE} "
                                 "refused requests a minute; not logged on chain")
            return [PullAnswer(rid, "rejected", "rate_limited", f"{peer} asked for too many records it may not "
                               f"have ({REFUSAL_LOGS_PER_MINUTE} refusals a minute); nothing logged, try later")]
        fields = {"peer": peer, "user": actor_text(request.user), "user_role": request.role,
                  "record_id": request.record.hex(), "purpose": request.purpose, "resource_type": resource_type}
        sealed, size = b"", 0
        if reason in ("granted", "emergency_override"):
            # Read before logging: a grant is committed only for a release that can be served.
            if self.held_bytes > MAX_HELD_BYTES:
                self._seen.pop(rid, None)  # nothing decided: the same request may come again
                return self._reject(peer, rid, "busy", f"{self.name} holds {self.held_bytes >> 20} MiB of "
                                    "releases waiting for their access logs; try again")
            try:
                _, resource, salt = await self.records.release(request.record)
                size = len(resource)
                sealed = crypto.seal_to(self.state.membership.member(peer).sealing_key,
                                        release_payload(request.record, resource, salt), rid)
                del resource
            except (EhrnodeError, KeyError, sqlite3.Error) as exc:
                # KeyError: anchored on chain but not in this vault (restored from an old copy?).
                reason = "erased" if isinstance(exc, EhrnodeError) and exc.reason == "erased" else "internal"
                if reason == "internal":
                    self.log.error("pull.failed", request=rid.hex()[:16], reason=type(exc).__name__,
                                   error=repr(exc), **fields)
        self.held_bytes += len(sealed)
        try:
            return await self._log_and_answer(peer, rid, data, reason, consent, sealed, size, started, fields, pull)
        finally:
            self.held_bytes -= len(sealed)

    async def _log_and_answer(self, peer: str, rid: bytes, data: bytes, reason: str, consent: bytes,
                              sealed: bytes, size: int, started: float, fields: dict[str, Any],
                              pull: Deciding) -> list[PullAnswer]:
        granted = reason in ("granted", "emergency_override")
        decision = {"request": data, "decision": "granted" if granted else "refused", "reason": reason,
                    "consent": consent}
        try:
            tx = await self.decisions.log(decision, pull)
            status = await self.hooks.wait_applied(tx.id, COMMIT_TIMEOUT)
            if status is not None and status != "ok" and len(decisions_of(tx)) > 1 \
                    and not self.state.access.accesses(request=rid):
                # The chain refused the batch, so none of it: this decision may not be why.
                self.log.warning("pull.relogged", request=rid.hex()[:16], tx_id=tx.id.hex(), status=status)
                tx = await self.decisions.log(decision, None)
                status = await self.hooks.wait_applied(tx.id, COMMIT_TIMEOUT)
        except AdmissionError as exc:
            self._seen.pop(rid, None)  # nothing decided: the same request may come again
            self.hooks.counters("unavailable")
            self.log.warning("pull.unavailable", peer=peer, request=rid.hex()[:16], reason=exc.reason)
            return [PullAnswer(rid, "unavailable", exc.reason, f"the access log cannot be submitted: {exc}")]
        tx_id = tx.id
        if status != "ok":
            # A refused envelope can still be carried again by a later block and then apply: what
            # the chain holds for this request is what counts.
            logged = self.state.access.accesses(request=rid)
            if logged and logged[0]["decision"] == decision["decision"] and logged[0]["reason"] == reason:
                tx_id, status = logged[0]["tx_id"], "ok"
        if status != "ok":
            self.hooks.counters("unavailable")
            self.log.error("pull.unavailable", peer=peer, request=rid.hex()[:16], tx_id=tx_id.hex(),
                           reason="access_log_not_committed", status=status)
            return [PullAnswer(rid, "unavailable", "access_log_not_committed",
                               f"the access log was not committed ({status or 'timeout'}); nothing served", tx_id)]
        fields["tx_id"] = tx_id.hex()
        if not granted:
            self.hooks.counters("refused")
            self.log.info("pull.refused", reason=reason, **fields)
            return [PullAnswer(rid, "refused", reason, _REFUSALS[reason], tx_id)]
        self.hooks.counters("served")
        (self.log.warning if reason == "emergency_override" else self.log.info)(
            "pull.served", emergency=reason == "emergency_override", bytes=size,
            seconds=round(time.monotonic() - started, 3), **fields)
        return split_served(rid, sealed, tx_id)

    async def _decide(self, request: PullRequest, now: int) -> tuple[str, bytes, str]:
        """(access.log reason, consent entry cited, resource type) for an authentic request."""
        anchors = self.state.anchors(record=request.record)
        if not anchors:
            return "not_found", b"", "unknown"
        anchor = anchors[0]
        if anchor["institution"] != self.name:
            return "not_owner", b"", anchor["resource_type"]
        if self.state.access.erasure(request.record) is not None:
            return "erased", b"", anchor["resource_type"]  # (erased here, not yet on chain: found on reading)
        empi = anchor["empi"]
        role = self.state.membership.member(request.requester).role

        def consent(default: bool) -> Decision:
            if empi is None:  # enrolment not committed: no consent can name the patient yet
                return Decision(default, "default", None)
            return self.state.consent.decide(empi, request.requester, request.purpose, anchor["resource_type"],
                                             now, holder=self.name, default=default)

        verdict = self.policy.decide(request.requester, role, request.role, request.purpose,
                                     anchor["resource_type"], consent)
        return verdict.reason, verdict.consent, anchor["resource_type"]


_REFUSALS = {
    "not_found": "no record with this id is anchored on the chain",
    "not_owner": "this institution does not own that record",
    "erased": "the record was erased by its owner",
    "policy": "the owner's access policy does not allow this requester, user role, purpose and resource type",
    "consent": "the patient's consent does not allow this access",
    "internal": "the owner cannot read this record now (its vault failed); ask again later",
}
