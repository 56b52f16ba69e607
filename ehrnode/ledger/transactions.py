"""Transactions: what members submit to the chain, each signed by the submitting member.

On the wire and in blocks a transaction is the canonical CBOR of
``{"kind", "chain", "submitter", "actor", "time", "nonce", "body", "sig"}``; its id
is the SHA-256 of exactly those bytes. ``actor`` is the submitting member's
pseudonym for the user who acted (15 bytes, see :mod:`ehrnode.users.store`); it
is absent when the node acted on its own (an owner deciding a pull by policy),
which is also how transactions from before users existed read, unchanged. The signature covers everything else, under a
domain tag and the chain id, so a transaction cannot be replayed on another
chain or as another kind of message. ``body`` is kind-specific and checked
by the kind's own schema.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from .. import codec, crypto
from ..codec import as_bytes, as_list, as_map, as_str, as_uint
from ..config import LEDGER_RULES
from ..errors import AdmissionError, CodecError, SchemaError
from .requests import PURPOSES, PullRequest

TX_DOMAIN = "ehrnode/tx/v1"
#: A signed transaction; sealed in its envelope (padding, tag, clear fields) it stays within the
#: 64 KiB a block or gossip frame allows per entry.
MAX_TX_BYTES = 63 * 1024
NONCE_SIZE = 16
ACTOR_SIZE = 15


def _note_body(body: Any) -> dict[str, Any]:
    m = as_map(body, "note", ("text",))
    as_str(m["text"], "note.text", max_len=4096)
    return dict(m)


_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{0,63}\Z")
#: An anchor's ``recorded_at`` is a whole UTC day: a time of day would let a member that pulls a
#: record recorded as the care happened match it against the released (date-shifted) times.
DAY_MS = 86_400_000


def recorded_day(time_ms: int) -> int:
    """The UTC day of ``time_ms``, as an anchor carries it (milliseconds at midnight)."""
    return time_ms - time_ms % DAY_MS
_SETTING = re.compile(r"^[A-Za-z0-9_.-]{1,32}\Z")


_ANCHOR_FIELDS = ("record", "patient", "recorded_at", "setting", "resource_type", "commitment", "position", "entry")
#: The most anchors one ``record.anchors`` transaction carries (about 220 bytes each, so a full
#: one is sealed in the 32 KiB envelope bucket).
MAX_ANCHORS = 128


def _check_anchor(m: Mapping[str, Any], what: str) -> None:
    """The fields every anchor has, whether alone in ``record.anchor`` or one of ``record.anchors``."""
    as_bytes(m["record"], f"{what}.record", size=16)
    as_bytes(m["patient"], f"{what}.patient", size=ENROLMENT_SIZE)
    if as_uint(m["recorded_at"], f"{what}.recorded_at") % DAY_MS:
        raise SchemaError(f"{what}.recorded_at: a whole UTC day (milliseconds at midnight)")
    if not _SETTING.match(as_str(m["setting"], f"{what}.setting", max_len=32)):
        raise SchemaError(f"{what}.setting: expected a short code")
    if not _RESOURCE_TYPE.match(as_str(m["resource_type"], f"{what}.resource_type", max_len=64)):
        raise SchemaError(f"{what}.resource_type: expected a FHIR resource type name")
    as_bytes(m["commitment"], f"{what}.commitment", size=32)
    if as_uint(m["position"], f"{what}.position") == 0:
        raise SchemaError(f"{what}.position: vault positions start at 1")
    as_bytes(m["entry"], f"{what}.entry", size=32)


def _anchor_body(body: Any) -> dict[str, Any]:
    """A record anchor: pseudonymous and salted; nothing in it names or describes the patient."""
    m = as_map(body, "record.anchor", ("epoch", "institution", *_ANCHOR_FIELDS))
    as_uint(m["epoch"], "record.anchor.epoch")
    as_str(m["institution"], "record.anchor.institution", max_len=32)
    _check_anchor(m, "record.anchor")
    return dict(m)


def _anchors_body(body: Any) -> dict[str, Any]:
    """Anchors of up to ``MAX_ANCHORS`` records of one institution, recorded together: each as a
    ``record.anchor`` says it, without the epoch and institution they share. Distinct records at
    distinct vault positions, ascending (the order the vault wrote them)."""
    m = as_map(body, "record.anchors", ("epoch", "institution", "anchors"))
    as_uint(m["epoch"], "record.anchors.epoch")
    as_str(m["institution"], "record.anchors.institution", max_len=32)
    anchors = as_list(m["anchors"], "record.anchors.anchors", max_len=MAX_ANCHORS)
    if not anchors:
        raise SchemaError("record.anchors.anchors: at least one anchor")
    records: set[bytes] = set()
    last = 0
    for i, anchor in enumerate(anchors):
        what = f"record.anchors.anchors[{i}]"
        _check_anchor(as_map(anchor, what, _ANCHOR_FIELDS), what)
        if anchor["position"] <= last:
            raise SchemaError(f"{what}.position: positions must ascend")
        if anchor["record"] in records:
            raise SchemaError(f"{what}.record: a record anchored twice")
        last = anchor["position"]
        records.add(anchor["record"])
    return dict(m)


def anchors_of(tx: Transaction) -> list[dict[str, Any]]:
    """Every anchor a ``record.anchor`` or ``record.anchors`` transaction carries, each with the
    epoch and institution (empty for any other kind)."""
    if tx.kind == "record.anchor":
        return [tx.body]
    if tx.kind == "record.anchors":
        shared = {"epoch": tx.body["epoch"], "institution": tx.body["institution"]}
        return [{**shared, **anchor} for anchor in tx.body["anchors"]]
    return []


#: An institution's pseudonym for one of its patients (its EMPI enrolment id).
ENROLMENT_SIZE = 16
EMPI_PATTERN = re.compile(r"^E[A-Z2-7]{24}\Z")


def _empi(value: Any, what: str) -> str:
    text = as_str(value, what, max_len=25)
    if not EMPI_PATTERN.match(text):
        raise SchemaError(f"{what}: not an EMPI")
    return text


def _enrol_body(body: Any) -> dict[str, Any]:
    """Keyed encodings only; their own schema is checked when the enrolment is applied."""
    m = as_map(body, "empi.enrol", ("epoch", "enrolment", "institution", "encodings"))
    as_uint(m["epoch"], "empi.enrol.epoch")
    as_bytes(m["enrolment"], "empi.enrol.enrolment", size=ENROLMENT_SIZE)
    as_str(m["institution"], "empi.enrol.institution", max_len=32)
    if not isinstance(m["encodings"], dict):
        raise SchemaError("empi.enrol.encodings: expected a map")
    return dict(m)


def _link_body(body: Any) -> dict[str, Any]:
    m = as_map(body, "empi.link", ("enrolment", "empi"))
    as_bytes(m["enrolment"], "empi.link.enrolment", size=ENROLMENT_SIZE)
    _empi(m["empi"], "empi.link.empi")
    return dict(m)


def _split_body(body: Any) -> dict[str, Any]:
    m = as_map(body, "empi.split", ("enrolment",))
    as_bytes(m["enrolment"], "empi.split.enrolment", size=ENROLMENT_SIZE)
    return dict(m)


def _not_duplicate_body(body: Any) -> dict[str, Any]:
    m = as_map(body, "empi.not_duplicate", ("a", "b"))
    as_bytes(m["a"], "empi.not_duplicate.a", size=ENROLMENT_SIZE)
    as_bytes(m["b"], "empi.not_duplicate.b", size=ENROLMENT_SIZE)
    return dict(m)


def _merge_body(body: Any) -> dict[str, Any]:
    m = as_map(body, "empi.merge", ("from", "into"))
    _empi(m["from"], "empi.merge.from")
    _empi(m["into"], "empi.merge.into")
    return dict(m)


def _accept_body(body: Any) -> dict[str, Any]:
    """An institution under the EMPIs a held link or merge joins agrees to it (by its tx id)."""
    m = as_map(body, "empi.accept", ("request",))
    as_bytes(m["request"], "empi.accept.request", size=32)
    return dict(m)


def _unmerge_body(body: Any) -> dict[str, Any]:
    m = as_map(body, "empi.unmerge", ("merge",))
    as_bytes(m["merge"], "empi.unmerge.merge", size=32)
    return dict(m)


CONSENT_PURPOSES = PURPOSES


def _consent_body(body: Any) -> dict[str, Any]:
    m = as_map(body, "consent", ("epoch", "empi", "grantee", "purposes", "scope", "until"))
    as_uint(m["epoch"], "consent.epoch")
    _empi(m["empi"], "consent.empi")
    grantee = as_str(m["grantee"], "consent.grantee", max_len=32)
    if not grantee:
        raise SchemaError("consent.grantee: empty")
    purposes = as_list(m["purposes"], "consent.purposes", max_len=len(CONSENT_PURPOSES))
    if not purposes or not all(isinstance(p, str) for p in purposes) or len(set(purposes)) != len(purposes) or not (
            purposes == ["*"] or all(p in CONSENT_PURPOSES for p in purposes)):
        raise SchemaError(f"consent.purposes: ['*'] or distinct purposes from {', '.join(CONSENT_PURPOSES)}")
    scope = as_list(m["scope"], "consent.scope", max_len=64)
    if not scope or not all(isinstance(t, str) for t in scope) or len(set(scope)) != len(scope) or not (
            scope == ["*"] or all(_RESOURCE_TYPE.match(t) for t in scope)):
        raise SchemaError("consent.scope: ['*'] or distinct FHIR resource type names")
    as_uint(m["until"], "consent.until")
    return dict(m)


#: Why an owner refused a pull (the codes an access log may carry).
ACCESS_REASONS = ("granted", "consent", "emergency_override", "policy", "not_found", "erased", "not_owner",
                  "internal")


def _check_decision(m: Mapping[str, Any], what: str) -> None:
    """The fields of one decision, whether alone in ``access.log`` or one of ``access.logs``."""
    PullRequest.decode(as_bytes(m["request"], f"{what}.request", max_len=MAX_REQUEST_BYTES))
    if as_str(m["decision"], f"{what}.decision", max_len=8) not in ("granted", "refused"):
        raise SchemaError(f"{what}.decision: granted or refused")
    if as_str(m["reason"], f"{what}.reason", max_len=32) not in ACCESS_REASONS:
        raise SchemaError(f"{what}.reason: one of {', '.join(ACCESS_REASONS)}")
    if (m["decision"] == "granted") != (m["reason"] in ("granted", "emergency_override")):
        raise SchemaError(f"{what}.reason: does not fit the decision")
    if len(as_bytes(m["consent"], f"{what}.consent", max_len=32)) not in (0, 32):
        raise SchemaError(f"{what}.consent: a consent transaction id, or empty for the default")


_DECISION_FIELDS = ("request", "decision", "reason", "consent")
MAX_REQUEST_BYTES = 1024
#: The most decisions one ``access.logs`` transaction carries: at most 1 KiB of request each, so a
#: full one stays within a transaction's size.
MAX_DECISIONS = 32


def _access_body(body: Any) -> dict[str, Any]:
    """One decision on one signed pull request, by the record's owner, committed before anything is served.

    The request itself is carried (and decoded strictly here), so every node can check that the
    requester asked: the ledger verifies its signature when it applies the decision.
    """
    m = as_map(body, "access.log", ("epoch", *_DECISION_FIELDS))
    as_uint(m["epoch"], "access.log.epoch")
    _check_decision(m, "access.log")
    return dict(m)


def _accesses_body(body: Any) -> dict[str, Any]:
    """Decisions on up to ``MAX_DECISIONS`` distinct pull requests, each as an ``access.log`` says
    it: what an owner decided within a few milliseconds, logged together."""
    m = as_map(body, "access.logs", ("epoch", "decisions"))
    as_uint(m["epoch"], "access.logs.epoch")
    decisions = as_list(m["decisions"], "access.logs.decisions", max_len=MAX_DECISIONS)
    if not decisions:
        raise SchemaError("access.logs.decisions: at least one decision")
    for i, decision in enumerate(decisions):
        _check_decision(as_map(decision, f"access.logs.decisions[{i}]", _DECISION_FIELDS),
                        f"access.logs.decisions[{i}]")
    if len({d["request"] for d in decisions}) != len(decisions):
        raise SchemaError("access.logs.decisions: a request decided twice")
    return dict(m)


def decisions_of(tx: Transaction) -> list[dict[str, Any]]:
    """Every decision an ``access.log`` or ``access.logs`` transaction carries (empty for any other kind)."""
    if tx.kind == "access.log":
        return [tx.body]
    if tx.kind == "access.logs":
        return list(tx.body["decisions"])
    return []


def _erase_body(body: Any) -> dict[str, Any]:
    """An owner destroyed a record's data keys. The reason's text stays at the owner; its digest is here."""
    m = as_map(body, "record.erase", ("epoch", "record", "reason"))
    as_uint(m["epoch"], "record.erase.epoch")
    as_bytes(m["record"], "record.erase.record", size=16)
    as_bytes(m["reason"], "record.erase.reason", size=32)
    return dict(m)


def _alert_body(body: Any) -> dict[str, Any]:
    """A requester received a record that does not match its anchor. ``access`` names the access:
    its request's id, or the id of an ``access.log`` that logged it alone."""
    m = as_map(body, "integrity.alert", ("epoch", "record", "owner", "access", "received"))
    as_uint(m["epoch"], "integrity.alert.epoch")
    as_bytes(m["record"], "integrity.alert.record", size=16)
    as_str(m["owner"], "integrity.alert.owner", max_len=32)
    as_bytes(m["access"], "integrity.alert.access", size=32)
    as_bytes(m["received"], "integrity.alert.received", size=32)
    return dict(m)


#: How an institution answered a request to name one of its users.
WHOIS_REASONS = ("granted", "policy", "not_found")


def _whois_request_body(body: Any) -> dict[str, Any]:
    """A member asks an institution who one of its user pseudonyms is, for a stated case."""
    m = as_map(body, "whois.request", ("epoch", "institution", "pseudonym", "case"))
    as_uint(m["epoch"], "whois.request.epoch")
    as_str(m["institution"], "whois.request.institution", max_len=32)
    as_bytes(m["pseudonym"], "whois.request.pseudonym", size=ACTOR_SIZE)
    if not as_str(m["case"], "whois.request.case", max_len=128).strip():
        raise SchemaError("whois.request.case: the case the request is made for")
    return dict(m)


def _whois_answer_body(body: Any) -> dict[str, Any]:
    """The institution's answer: the user sealed to the asker's key, or why not."""
    m = as_map(body, "whois.answer", ("epoch", "request", "reason", "sealed"))
    as_uint(m["epoch"], "whois.answer.epoch")
    as_bytes(m["request"], "whois.answer.request", size=32)
    if as_str(m["reason"], "whois.answer.reason", max_len=16) not in WHOIS_REASONS:
        raise SchemaError(f"whois.answer.reason: one of {', '.join(WHOIS_REASONS)}")
    if (m["reason"] == "granted") != bool(as_bytes(m["sealed"], "whois.answer.sealed", max_len=1024)):
        raise SchemaError("whois.answer.sealed: the sealed user exactly when granted")
    return dict(m)


#: Members an epoch key may be sealed to (the largest consortium a grant can serve).
MAX_MEMBERS = 256


def _keys_epoch_body(body: Any) -> dict[str, Any]:
    """The key of the next epoch, sealed to each current member (see :mod:`.epochs`)."""
    m = as_map(body, "keys.epoch", ("epoch", "check", "sealed"))
    if as_uint(m["epoch"], "keys.epoch.epoch") == 0:
        raise SchemaError("keys.epoch.epoch: epoch 0 is opened by genesis")
    as_bytes(m["check"], "keys.epoch.check", size=32)
    sealed = m["sealed"]
    if not isinstance(sealed, dict) or not 0 < len(sealed) <= MAX_MEMBERS:
        raise SchemaError(f"keys.epoch.sealed: a map of 1-{MAX_MEMBERS} members to sealed keys")
    for name, copy in sealed.items():
        as_str(name, "keys.epoch.sealed name", max_len=32)
        as_bytes(copy, f"keys.epoch.sealed[{name}]", max_len=128)
    return dict(m)


def _keys_request_body(body: Any) -> dict[str, Any]:
    """A member cannot open its copy of an epoch's key (missing, or not the key its check value
    commits to) and asks the members that hold it to seal it again."""
    m = as_map(body, "keys.request", ("epoch",))
    as_uint(m["epoch"], "keys.request.epoch")
    return dict(m)


def _keys_reseal_body(body: Any) -> dict[str, Any]:
    """An epoch's key sealed again to one member's current sealing key."""
    m = as_map(body, "keys.reseal", ("epoch", "member", "sealed"))
    as_uint(m["epoch"], "keys.reseal.epoch")
    as_str(m["member"], "keys.reseal.member", max_len=32)
    as_bytes(m["sealed"], "keys.reseal.sealed", max_len=128)
    return dict(m)


#: How a governance proposal changes the consortium.
CHANGES = ("add", "remove", "rotate-key")
_MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}\Z")
_ADDRESS = re.compile(r"^\[?[A-Za-z0-9.:_-]{1,253}\]?:[0-9]{1,5}\Z")
#: Epoch keys an add or rotate-key proposal re-seals for the member (every epoch so far; 640
#: sealed copies fill most of a transaction).
MAX_HISTORY = 640


def _propose_body(body: Any) -> dict[str, Any]:
    """A change of membership, put to the current validators (see :mod:`.governance`).

    ``add`` and ``rotate-key`` name the member's keys and address, and carry ``history``:
    the key of every epoch so far sealed to the member's (new) sealing key, so it can read the
    chain from genesis. ``remove`` names only the member.
    """
    m = as_map(body, "consortium.propose", ("change", "name", "reason"),
               optional=("role", "signing_key", "sealing_key", "address", "history"))
    change = as_str(m["change"], "consortium.propose.change", max_len=16)
    if change not in CHANGES:
        raise SchemaError(f"consortium.propose.change: one of {', '.join(CHANGES)}")
    if not _MEMBER_NAME.match(as_str(m["name"], "consortium.propose.name", max_len=32)):
        raise SchemaError("consortium.propose.name: letters, digits, '_' and '-', at most 32")
    as_str(m["reason"], "consortium.propose.reason", max_len=512)
    wanted = {"add": {"role", "signing_key", "sealing_key", "address", "history"},
              "rotate-key": {"signing_key", "sealing_key", "address", "history"}}.get(change, set())
    given = set(m) - {"change", "name", "reason"}
    if given != wanted:
        raise SchemaError(f"consortium.propose: {change} takes {', '.join(sorted(wanted)) or 'no member fields'}")
    if "role" in m and as_str(m["role"], "consortium.propose.role", max_len=16) not in ("institution", "regulator"):
        raise SchemaError("consortium.propose.role: institution or regulator")
    if "signing_key" in m:
        as_bytes(m["signing_key"], "consortium.propose.signing_key", size=32)
        as_bytes(m["sealing_key"], "consortium.propose.sealing_key", size=32)
        address = as_str(m["address"], "consortium.propose.address", max_len=260)
        if not _ADDRESS.match(address) or not 0 < int(address.rpartition(":")[2]) < 65536:
            raise SchemaError("consortium.propose.address: HOST:PORT")
        history = as_list(m["history"], "consortium.propose.history", max_len=MAX_HISTORY)
        if not history:
            raise SchemaError("consortium.propose.history: at least the epoch 0 key")
        for epoch, copy in enumerate(history):
            as_bytes(copy, f"consortium.propose.history[{epoch}]", max_len=128)
    return dict(m)


def _vote_body(body: Any) -> dict[str, Any]:
    m = as_map(body, "consortium.vote", ("proposal",))
    as_bytes(m["proposal"], "consortium.vote.proposal", size=32)
    return dict(m)


#: The most values one OPRF batch carries.
MAX_OPRF_BATCH = 4096


def _oprf_batch_body(body: Any) -> dict[str, Any]:
    """A member announces a batch of blinded values it will have the OPRF key's holders evaluate."""
    m = as_map(body, "empi.oprf_batch", ("round", "size", "digest"))
    as_uint(m["round"], "empi.oprf_batch.round")
    if not 0 < as_uint(m["size"], "empi.oprf_batch.size") <= MAX_OPRF_BATCH:
        raise SchemaError(f"empi.oprf_batch.size: 1 to {MAX_OPRF_BATCH}")
    as_bytes(m["digest"], "empi.oprf_batch.digest", size=32)
    return dict(m)


def _oprf_deal_body(body: Any) -> dict[str, Any]:
    """A dealing in a round of the OPRF key (its points and sealed shares are checked against the
    round when applied: :mod:`.oprf_rounds`)."""
    m = as_map(body, "keys.oprf_deal", ("round", "commitments", "shares"))
    as_uint(m["round"], "keys.oprf_deal.round")
    for i, point in enumerate(as_list(m["commitments"], "keys.oprf_deal.commitments", max_len=64)):
        as_bytes(point, f"keys.oprf_deal.commitments[{i}]", size=33)
    shares = m["shares"]
    if not isinstance(shares, dict) or not 0 < len(shares) <= 64:
        raise SchemaError("keys.oprf_deal.shares: expected a map of at most 64 members")
    for name, sealed in shares.items():
        if not isinstance(name, str) or not _MEMBER_NAME.match(name):
            raise SchemaError("keys.oprf_deal.shares: keys are member names")
        as_bytes(sealed, f"keys.oprf_deal.shares[{name}]", max_len=128)
    return dict(m)


def _oprf_verdict_body(body: Any) -> dict[str, Any]:
    m = as_map(body, "keys.oprf_verdict", ("round", "complaints"))
    as_uint(m["round"], "keys.oprf_verdict.round")
    complaints = as_list(m["complaints"], "keys.oprf_verdict.complaints", max_len=64)
    for name in complaints:
        if not _MEMBER_NAME.match(as_str(name, "keys.oprf_verdict.complaints[]", max_len=32)):
            raise SchemaError("keys.oprf_verdict.complaints: member names")
    if len(set(complaints)) != len(complaints):
        raise SchemaError("keys.oprf_verdict.complaints: each dealer once")
    return dict(m)


def _oprf_reveal_body(body: Any) -> dict[str, Any]:
    m = as_map(body, "keys.oprf_reveal", ("round", "complainer", "share"))
    as_uint(m["round"], "keys.oprf_reveal.round")
    if not _MEMBER_NAME.match(as_str(m["complainer"], "keys.oprf_reveal.complainer", max_len=32)):
        raise SchemaError("keys.oprf_reveal.complainer: a member name")
    as_bytes(m["share"], "keys.oprf_reveal.share", size=32)
    return dict(m)


def _oprf_close_body(body: Any) -> dict[str, Any]:
    m = as_map(body, "keys.oprf_close", ("round",))
    as_uint(m["round"], "keys.oprf_close.round")
    return dict(m)


#: How a transaction's encoding starts after the map's header: the key ``sig`` and the header of
#: its 64 bytes. What precedes the unsigned map in the bytes a submitter signs: an array of two,
#: and the domain.
_SIG_ENTRY = b"\x63sig\x58\x40"
_SIGNED_PREFIX = b"\x82" + codec.encode(TX_DOMAIN)

#: Each kind's body schema: a function that raises SchemaError or returns the checked body.
KINDS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "note": _note_body, "record.anchor": _anchor_body, "record.anchors": _anchors_body, "empi.enrol": _enrol_body,
    "empi.link": _link_body,
    "empi.not_duplicate": _not_duplicate_body, "empi.merge": _merge_body, "empi.unmerge": _unmerge_body,
    "empi.accept": _accept_body,
    "empi.split": _split_body, "consent.grant": _consent_body, "consent.revoke": _consent_body,
    "access.log": _access_body, "access.logs": _accesses_body, "record.erase": _erase_body,
    "integrity.alert": _alert_body,
    "whois.request": _whois_request_body, "whois.answer": _whois_answer_body, "keys.epoch": _keys_epoch_body,
    "consortium.propose": _propose_body, "consortium.vote": _vote_body, "keys.request": _keys_request_body,
    "keys.reseal": _keys_reseal_body, "keys.oprf_deal": _oprf_deal_body, "keys.oprf_verdict": _oprf_verdict_body,
    "keys.oprf_reveal": _oprf_reveal_body, "empi.oprf_batch": _oprf_batch_body,
    "keys.oprf_close": _oprf_close_body,
}


#: The ledger rules that added each kind (kinds not listed: rules 1). On a chain of earlier rules
#: the kind is unknown (see ``config.LEDGER_RULES``).
SINCE_RULES = {"record.anchors": 2, "access.logs": 2}
#: The ledger rules from which an ``integrity.alert`` names the access by its request (an
#: ``access.logs`` logs several); before, by the ``access.log`` that logged it alone.
ALERTS_BY_REQUEST_SINCE = SINCE_RULES["access.logs"]


@dataclass(frozen=True)
class Transaction:
    kind: str
    chain_id: str
    submitter: str
    time: int
    nonce: bytes
    body: dict[str, Any]
    signature: bytes
    actor: bytes = b""

    def _unsigned(self) -> dict[str, Any]:
        unsigned = {
            "kind": self.kind, "chain": self.chain_id, "submitter": self.submitter, "time": self.time,
            "nonce": self.nonce, "body": self.body,
        }
        if self.actor:
            unsigned["actor"] = self.actor
        return unsigned

    @cached_property
    def encoded(self) -> bytes:
        wire = self._unsigned()
        wire["sig"] = self.signature
        return codec.encode(wire)

    @cached_property
    def id(self) -> bytes:
        return crypto.sha256(self.encoded)

    @classmethod
    def create(
        cls, kind: str, body: dict[str, Any], *, chain_id: str, submitter: str, identity: crypto.Identity,
        time_ms: int, nonce: bytes | None = None, actor: bytes = b"",
    ) -> Transaction:
        if len(actor) not in (0, ACTOR_SIZE):
            raise SchemaError(f"transaction.actor: {ACTOR_SIZE} bytes or none")
        unsigned = cls(kind, chain_id, submitter, time_ms, nonce or os.urandom(NONCE_SIZE), KINDS[kind](body), b"",
                       actor)
        message = crypto.signing_bytes(TX_DOMAIN, unsigned._unsigned())
        signature = identity.sign(message)
        tx = cls(unsigned.kind, chain_id, submitter, time_ms, unsigned.nonce, unsigned.body, signature, actor)
        if len(tx.encoded) > MAX_TX_BYTES:
            # Every other node would refuse it as malformed.
            raise SchemaError(f"{kind}: transaction of {len(tx.encoded)} bytes exceeds {MAX_TX_BYTES}")
        return tx

    @classmethod
    def decode(cls, data: bytes, rules: int = LEDGER_RULES) -> Transaction:
        """Strictly decode ``data`` as a transaction of a chain of ledger ``rules`` (raises
        CodecError/SchemaError)."""
        if len(data) > MAX_TX_BYTES:
            raise CodecError(f"transaction of {len(data)} bytes exceeds {MAX_TX_BYTES}", reason="too_large")
        m = as_map(codec.decode(data, max_size=MAX_TX_BYTES), "transaction",
                   ("kind", "chain", "submitter", "time", "nonce", "body", "sig"), optional=("actor",))
        kind = as_str(m["kind"], "transaction.kind", max_len=32)
        if kind not in KINDS or SINCE_RULES.get(kind, 1) > rules:
            raise SchemaError(f"transaction.kind: unknown kind {kind!r}")
        tx = cls(
            kind,
            as_str(m["chain"], "transaction.chain", max_len=64),
            as_str(m["submitter"], "transaction.submitter", max_len=32),
            as_uint(m["time"], "transaction.time"),
            as_bytes(m["nonce"], "transaction.nonce", size=NONCE_SIZE),
            KINDS[kind](m["body"]),
            as_bytes(m["sig"], "transaction.sig", size=crypto.SIGNATURE_SIZE),
            as_bytes(m["actor"], "transaction.actor", size=ACTOR_SIZE) if "actor" in m else b"",
        )
        # The decoder checked that ``data`` is the canonical encoding: no need to encode again.
        tx.__dict__["encoded"] = data
        return tx

    def signed_bytes(self) -> bytes:
        """What the signature covers: :func:`crypto.signing_bytes` of the transaction without
        ``sig``. Cut from the encoding rather than encoded again: ``sig`` is the one key of three
        letters, so canonical order puts it first, and the rest of the map is the unsigned one."""
        encoded = self.encoded
        if encoded[1:7] == _SIG_ENTRY and 0xA1 <= encoded[0] <= 0xB7:
            return _SIGNED_PREFIX + bytes((encoded[0] - 1,)) + encoded[7 + crypto.SIGNATURE_SIZE:]
        return crypto.signing_bytes(TX_DOMAIN, self._unsigned())

    def check_signature(self, public_key: bytes) -> None:
        if not crypto.verify(public_key, self.signed_bytes(), self.signature):
            raise AdmissionError(f"transaction {self.id.hex()[:16]}: bad signature", reason="bad_signature")

    def summary(self) -> dict[str, Any]:
        """The JSON view of a transaction (for the API and the CLI)."""
        return {
            "id": self.id.hex(), "kind": self.kind, "submitter": self.submitter,
            "actor": actor_text(self.actor), "time": self.time,
            "body": _json_view(self.body),
        }


def actor_text(raw: bytes) -> str | None:
    """A user pseudonym as shown (``U`` and 24 base32 characters); None for the node itself."""
    return "U" + base64.b32encode(raw).decode() if raw else None


def _json_view(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _json_view(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_view(v) for v in value]
    return value
