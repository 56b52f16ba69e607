"""The ledger state: what committed blocks mean, derived deterministically.

Every node applies the same committed blocks in the same order and gets the
same tables. A block's payload is opaque to consensus, so a leader can put
anything in it: an envelope that does not decode, is sealed under an epoch
that is not current (or the one just before: transactions in flight across a
rotation), does not open under its epoch's key, or holds a transaction that is
for another chain, not signed by its submitter or a repeat of an earlier one is
recorded as ``invalid`` with its reason and otherwise ignored, the same way
everywhere. Every member holds every epoch key (:mod:`.epochs`), so every
member judges every envelope alike; one that lacks a key stops applying
(:class:`~ehrnode.errors.KeyUnavailable`) rather than judge differently.

State is applied in one SQLite transaction per block together with the
applied height, so after a crash it resumes exactly at the first block it had
not applied.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .. import crypto
from ..config import LEDGER_RULES, Address, Member
from ..consensus.types import Block
from ..epochs import EpochGrant, EpochKeys
from ..errors import AdmissionError, CodecError, CryptoError, KeyUnavailable, StoreError
from ..membership import Membership
from ..storage import open_db, transaction
from .access import SCHEMA as ACCESS_SCHEMA
from .access import AccessLog
from .consent import SCHEMA as CONSENT_SCHEMA
from .consent import ConsentRegistry
from .empi_registry import SCHEMA as EMPI_SCHEMA
from .empi_registry import EmpiRegistry, scoped_enrolment
from .envelope import PUBLIC_CLASSES, Envelope, kind_class, public_key
from .governance import SCHEMA as GOVERNANCE_SCHEMA
from .governance import Governance
from .oprf_rounds import KINDS as OPRF_KINDS
from .oprf_rounds import SCHEMA as OPRF_SCHEMA
from .oprf_rounds import OprfRounds
from .oprf_usage import SCHEMA as OPRF_USAGE_SCHEMA
from .oprf_usage import OprfUsage
from .transactions import Transaction, anchors_of, decisions_of
from .whois import SCHEMA as WHOIS_SCHEMA
from .whois import WhoisLog

_SCHEMA = """
CREATE TABLE IF NOT EXISTS txs (
    id BLOB PRIMARY KEY, height INTEGER NOT NULL, position INTEGER NOT NULL,
    kind TEXT NOT NULL, submitter TEXT, time INTEGER, status TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS txs_height ON txs(height);
CREATE TABLE IF NOT EXISTS applied (only INTEGER PRIMARY KEY CHECK (only = 0), height INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS public_applied (only INTEGER PRIMARY KEY CHECK (only = 0), height INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rules (only INTEGER PRIMARY KEY CHECK (only = 0), version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS anchors (
    record BLOB PRIMARY KEY, patient BLOB NOT NULL, institution TEXT NOT NULL, recorded_at INTEGER NOT NULL,
    setting TEXT NOT NULL, resource_type TEXT NOT NULL, commitment BLOB NOT NULL, position INTEGER NOT NULL,
    entry BLOB NOT NULL, epoch INTEGER NOT NULL, height INTEGER NOT NULL, tx_id BLOB NOT NULL,
    UNIQUE (institution, position));
CREATE INDEX IF NOT EXISTS anchors_patient ON anchors(patient);
CREATE INDEX IF NOT EXISTS anchors_commitment ON anchors(commitment);
CREATE INDEX IF NOT EXISTS anchors_tx ON anchors(tx_id);
CREATE TABLE IF NOT EXISTS actions (
    tx_id BLOB PRIMARY KEY, actor BLOB NOT NULL, submitter TEXT NOT NULL, kind TEXT NOT NULL, time INTEGER NOT NULL,
    height INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS actions_actor ON actions(actor);
CREATE TABLE IF NOT EXISTS epochs (
    epoch INTEGER PRIMARY KEY, starts INTEGER NOT NULL, time INTEGER NOT NULL, check_value BLOB NOT NULL,
    opened_by TEXT NOT NULL, tx_id BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS epoch_grants (
    epoch INTEGER NOT NULL, member TEXT NOT NULL, sealed BLOB NOT NULL, PRIMARY KEY (epoch, member));
CREATE TABLE IF NOT EXISTS key_reseals (
    tx_id BLOB PRIMARY KEY, epoch INTEGER NOT NULL, member TEXT NOT NULL, sealed BLOB NOT NULL, by TEXT NOT NULL,
    height INTEGER NOT NULL);
"""

#: Roles allowed to submit each kind (kinds not listed: any member).
_INSTITUTIONS = frozenset({"institution"})
_KIND_ROLES = {kind: _INSTITUTIONS for kind in (
    "record.anchor", "record.anchors", "empi.enrol", "empi.link", "empi.not_duplicate", "empi.merge", "empi.unmerge",
    "empi.split",
    "empi.accept", "empi.oprf_batch",
    "consent.grant", "consent.revoke", "access.log", "access.logs", "record.erase", "whois.answer")}

ANCHOR_COLUMNS = ("record", "patient", "institution", "recorded_at", "setting", "resource_type", "commitment",
                  "position", "entry", "epoch", "height", "tx_id")
_INSERT_ANCHOR = f"INSERT INTO anchors ({', '.join(ANCHOR_COLUMNS)}) VALUES ({', '.join('?' * len(ANCHOR_COLUMNS))})"


class LedgerState:
    """The tables of one member's ledger.

    ``members`` is the genesis membership (or, for tools and tests that never seal to a
    member, a map of names to signing keys, with ``roles``); ``rules``, the ledger rules the
    chain's genesis names.
    """

    def __init__(self, path: Path, chain_id: str, members: Membership | Mapping[str, bytes],
                 roles: Mapping[str, str] | None = None, *, keys: EpochKeys | None = None,
                 rules: int = LEDGER_RULES) -> None:
        self.chain_id = chain_id
        self.rules = rules
        genesis = members if isinstance(members, Membership) else _known_by_keys(members, roles or {})
        self.keys = keys or EpochKeys(chain_id, "", None)
        self._db = open_db(path, _SCHEMA + EMPI_SCHEMA + CONSENT_SCHEMA + ACCESS_SCHEMA + WHOIS_SCHEMA
                           + GOVERNANCE_SCHEMA + OPRF_SCHEMA + OPRF_USAGE_SCHEMA, "ledger state")
        self._read_heights()
        self._check_rules()
        self.governance = Governance(self._db, genesis)
        self.oprf = OprfRounds(self._db)
        self.oprf_usage = OprfUsage(self._db)
        #: The members (signing keys) and roles as of the next block the ledger applies; updated
        #: in place, as the access and whois logs read the same maps.
        self.members: dict[str, bytes] = {}
        self.roles: dict[str, str] = {}
        self._use_membership(self.applied_height + 1)
        # (epoch, first height) of every epoch after 0, oldest first.
        self._epochs: list[tuple[int, int]] = self._db.execute(
            "SELECT epoch, starts FROM epochs WHERE epoch > 0 ORDER BY epoch").fetchall()
        for grant in self.epoch_grants():
            self.keys.learn(grant)
        for body in self.governance.histories_for(self.keys.member):
            self._take_history(body)
        for epoch, sealed in self._db.execute("SELECT epoch, sealed FROM key_reseals WHERE member = ? "
                                              "ORDER BY height", (self.keys.member,)).fetchall():
            self.keys.offer(epoch, sealed)
        # Valid public-class transactions of blocks whose public part is applied and whose
        # sealed part is not yet (returned with the block's other transactions).
        self._public_valid: dict[int, list[Transaction]] = {}
        self._decoded: dict[int, list[Envelope | None]] = {}  # likewise: its envelopes, decoded
        self.empi = EmpiRegistry(self._db)
        self.consent = ConsentRegistry(self._db, self.empi)
        self.access = AccessLog(self._db, chain_id, self.members, rules)
        self.whois = WhoisLog(self._db, self.roles)
        self._empi_kinds = {
            "empi.enrol": self.empi.enrol, "empi.link": self.empi.link, "empi.not_duplicate": self.empi.not_duplicate,
            "empi.merge": self.empi.merge, "empi.unmerge": self.empi.unmerge, "empi.split": self.empi.split,
            "empi.accept": self.empi.accept,
        }

    def close(self) -> None:
        self._db.close()

    def _check_rules(self) -> None:
        """The rules this state was applied under are the genesis's: a genesis edited to other
        rules would have the chain's history read by other rules than it was applied by."""
        row = self._db.execute("SELECT version FROM rules").fetchone()
        # A state applied before rules were recorded was applied under rules 1.
        applied = row[0] if row else (1 if self._applied or self._public else self.rules)
        if applied != self.rules:
            raise StoreError(f"this ledger state was applied under ledger rules {applied}, but genesis names rules "
                             f"{self.rules}: a consortium's rules are fixed at its founding", reason="rules")
        if row is None:
            self._db.execute("INSERT INTO rules VALUES (0, ?)", (self.rules,))

    def _read_heights(self) -> None:
        # Kept in memory: every admitted transaction asks (the tables change only in apply).
        row = self._db.execute("SELECT height FROM applied").fetchone()
        self._applied = row[0] if row else 0
        row = self._db.execute("SELECT height FROM public_applied").fetchone()
        self._public = max(row[0] if row else 0, self._applied)

    @property
    def applied_height(self) -> int:
        return self._applied

    @property
    def public_height(self) -> int:
        """The last block whose public-class transactions (membership, epoch keys) are applied:
        never behind :attr:`applied_height`, and ahead of it while this member lacks a key."""
        return self._public

    @property
    def membership(self) -> Membership:
        """The newest membership (it may start with the next block)."""
        return self.governance.latest

    def membership_at(self, height: int) -> Membership:
        return self.governance.at(height)

    def _use_membership(self, height: int) -> None:
        membership = self.governance.at(height)
        if set(self.members) != set(membership.names) or self.members != membership.signing_keys:
            self.members.clear()
            self.members.update(membership.signing_keys)
            self.roles.clear()
            self.roles.update(membership.roles)

    def apply_public(self, block: Block, admitted: Admitted | None = None) -> None:
        """Apply the public-class transactions of one committed block (the next after
        :attr:`public_height`): proposals, votes, epoch key grants.

        This part needs no epoch key, so every member, even one that cannot read an epoch
        yet, follows who the members are and which keys were sealed to it. Envelopes
        ``admitted`` holds are not decoded again.
        """
        height = block.height
        if height <= self.public_height:
            return
        if height != self.public_height + 1:
            raise StoreError(f"block {height} applied after height {self.public_height}", reason="apply_gap")
        valid: list[Transaction] = []
        seen: set[bytes] = set()
        membership = self.governance.at(height)
        with transaction(self._db, f"apply block {height} (public part)") as db:
            if height == 1:
                db.execute("INSERT OR IGNORE INTO epochs VALUES (0, 1, ?, x'', 'genesis', x'')", (block.timestamp,))
            # A round of the OPRF key opens at genesis and in the first block after the institutions change.
            self.oprf.sync(db, membership, height, block.timestamp)
            decoded = [(admitted.envelope(crypto.sha256(data)) if admitted else None) or _decode(data)
                       for data in block.payload]
            publics = [i for i, envelope in enumerate(decoded) if envelope and envelope.kind_class in PUBLIC_CLASSES]
            for position in publics:
                tx_id, status, tx = self._classify(block.payload[position], height, None, membership.signing_keys,
                                                   decoded[position])
                if status == "ok" and tx_id in seen:
                    status = "invalid:duplicate"
                seen.add(tx_id)
                if tx is not None and status == "ok":
                    status = self._apply_public_kind(db, tx, height, block.timestamp)
                    if status == "ok":
                        valid.append(tx)
                db.execute("INSERT OR IGNORE INTO txs VALUES (?, ?, ?, ?, ?, ?, ?)", (
                    tx_id, height, position, tx.kind if tx else "unknown", tx.submitter if tx else None,
                    tx.time if tx else None, status))
            db.execute("INSERT OR REPLACE INTO public_applied VALUES (0, ?)", (height,))
        self._public = height
        if height == self._applied + 1:  # the rest of the block is applied next: decode it once
            self._decoded[height] = decoded
        # What this block opened takes effect from the next block (and only once it is stored).
        for tx in valid:
            if tx.kind == "keys.epoch":
                self._epochs.append((tx.body["epoch"], height + 1))
                self.keys.learn(EpochGrant(tx.body["epoch"], tx.body["check"], tx.body["sealed"]))
            elif tx.kind == "consortium.propose":
                self._take_history(tx.body)
            elif tx.kind == "keys.reseal" and tx.body["member"] == self.keys.member:
                self.keys.offer(tx.body["epoch"], tx.body["sealed"])
        if any(tx.kind in ("consortium.propose", "consortium.vote") for tx in valid):
            self.governance.reload()
        if valid:
            self._public_valid[height] = valid

    def _take_history(self, body: dict[str, Any] | None) -> None:
        if body is not None and body.get("name") == self.keys.member and "history" in body:
            for epoch, sealed in enumerate(body["history"]):
                self.keys.offer(epoch, sealed)

    def _apply_public_kind(self, db: sqlite3.Connection, tx: Transaction, height: int, block_time: int) -> str:
        if tx.kind == "keys.epoch":
            return self._apply_epoch(db, tx, height, block_time)
        if tx.kind in OPRF_KINDS:
            return self.oprf.apply(db, tx, height, block_time)
        if tx.kind in ("keys.request", "keys.reseal"):
            latest = db.execute("SELECT MAX(epoch) FROM epochs").fetchone()[0] or 0
            if tx.body["epoch"] > latest:
                return "invalid:future_epoch"
            if tx.kind == "keys.request":
                return "ok"  # members holding the key answer it (the node, as it commits)
            if tx.body["member"] not in self.governance.at(height):
                return "invalid:not_member"
            db.execute("INSERT INTO key_reseals VALUES (?, ?, ?, ?, ?, ?)", (
                tx.id, tx.body["epoch"], tx.body["member"], tx.body["sealed"], tx.submitter, height))
            return "ok"
        key_epochs = db.execute("SELECT COUNT(*) FROM epochs").fetchone()[0]
        return self.governance.apply(db, tx, height, key_epochs)

    def apply(self, block: Block, admitted: Admitted | None = None) -> list[Transaction]:
        """Apply one committed block (the next height); returns its valid transactions.

        Its public part is applied first if it is not yet. ``admitted.get(envelope_id)`` may
        return the transaction this node already decoded and whose signature it checked when
        admitting it (same id, so the very same bytes): it is not decoded or checked again. Raises
        KeyUnavailable (applying nothing of the sealed part) if this member lacks a key the
        block needs.
        """
        if block.height != self.applied_height + 1:
            raise StoreError(f"block {block.height} applied after height {self.applied_height}", reason="apply_gap")
        self.apply_public(block, admitted)
        self._use_membership(block.height)
        valid: list[Transaction] = []
        seen: set[bytes] = set()
        decoded = self._decoded.pop(block.height, None) or [_decode(data) for data in block.payload]
        with transaction(self._db, f"apply block {block.height}") as db:
            for position, data in enumerate(block.payload):
                envelope = decoded[position]
                if envelope is not None and envelope.kind_class in PUBLIC_CLASSES:
                    continue  # the public part's
                tx_id, status, tx = self._classify(data, block.height, admitted, self.members, envelope)
                if status == "ok" and tx_id in seen:
                    status = "invalid:duplicate"
                seen.add(tx_id)
                if tx is not None and status == "ok":
                    status = self._apply_kind(db, tx, block.height, block.timestamp)
                    if status == "ok":
                        valid.append(tx)
                        if tx.actor:
                            db.execute("INSERT INTO actions VALUES (?, ?, ?, ?, ?, ?)",
                                       (tx_id, tx.actor, tx.submitter, tx.kind, tx.time, block.height))
                db.execute("INSERT OR IGNORE INTO txs VALUES (?, ?, ?, ?, ?, ?, ?)", (
                    tx_id, block.height, position, tx.kind if tx else "unknown", tx.submitter if tx else None,
                    tx.time if tx else None, status,
                ))
            db.execute("INSERT OR REPLACE INTO applied VALUES (0, ?)", (block.height,))
        self._applied = block.height
        return self._public_valid.pop(block.height, []) + valid

    def _apply_kind(self, db: sqlite3.Connection, tx: Transaction, height: int, block_time: int) -> str:
        """What a valid transaction does to the tables; returns its status (``ok`` or why not)."""
        allowed = _KIND_ROLES.get(tx.kind)
        if allowed is not None and self.roles.get(tx.submitter) not in allowed:
            return "invalid:role"
        if tx.kind in ("record.anchor", "record.anchors"):
            return self._anchor(db, tx, height)
        elif tx.kind == "empi.oprf_batch":
            return self.oprf_usage.apply(db, tx, height, block_time)
        elif tx.kind in self._empi_kinds:
            return self._empi_kinds[tx.kind](db, tx.body, tx.submitter, height, tx.id)
        elif tx.kind in ("consent.grant", "consent.revoke"):
            if tx.body["grantee"] != "*" and tx.body["grantee"] not in self.members:
                return "invalid:unknown_grantee"
            return self.consent.apply(db, tx.kind.partition(".")[2], tx.body, tx.submitter, height, tx.time, tx.id)
        elif tx.kind in ("access.log", "access.logs"):
            return self.access.apply_decisions(db, decisions_of(tx), tx.submitter, height, tx.time, tx.id,
                                               block_time)
        elif tx.kind == "record.erase":
            return self.access.apply_erase(db, tx.body, tx.submitter, height, tx.time, tx.id)
        elif tx.kind == "integrity.alert":
            return self.access.apply_alert(db, tx.body, tx.submitter, height, tx.time, tx.id)
        elif tx.kind == "whois.request":
            return self.whois.apply_request(db, tx.body, tx.submitter, tx.actor, height, tx.time, tx.id)
        elif tx.kind == "whois.answer":
            return self.whois.apply_answer(db, tx.body, tx.submitter, height, tx.id)
        return "ok"

    @staticmethod
    def _anchor(db: sqlite3.Connection, tx: Transaction, height: int) -> str:
        """Every anchor of the transaction, or none: a record or vault position already anchored
        (by any transaction) refuses the whole of it."""
        if tx.body["institution"] != tx.submitter:
            return "invalid:not_owner"  # an institution anchors only its own records
        rows = [(
            # An institution's records can only name its own enrolments.
            a["record"], scoped_enrolment(tx.submitter, a["patient"]), tx.submitter, a["recorded_at"], a["setting"],
            a["resource_type"], a["commitment"], a["position"], a["entry"], a["epoch"], height, tx.id,
        ) for a in anchors_of(tx)]
        # The table's keys are the rule (one anchor per record, one per vault position of an
        # institution): the inserts find a duplicate themselves, and undo the ones before it.
        db.execute("SAVEPOINT anchor")
        try:
            db.executemany(_INSERT_ANCHOR, rows)
        except sqlite3.IntegrityError:
            db.execute("ROLLBACK TO anchor")
            return "invalid:duplicate_record"
        finally:
            db.execute("RELEASE anchor")
        return "ok"

    def _classify(self, data: bytes, height: int, admitted: Admitted | None,
                  members: Mapping[str, bytes], envelope: Envelope | None = None,
                  ) -> tuple[bytes, str, Transaction | None]:
        """(transaction id, status, transaction) of one payload entry; the id is the envelope's
        when what is inside cannot be read."""
        envelope_id = crypto.sha256(data)
        known = admitted.get(envelope_id) if admitted else None
        try:
            envelope, tx = self.open_envelope(data, height, opened=known, envelope=envelope)
        except AdmissionError as exc:
            return envelope_id, f"invalid:{exc.reason}", None
        if tx.chain_id != self.chain_id:
            return tx.id, "invalid:wrong_chain", tx
        key = members.get(tx.submitter)
        if key is None:
            return tx.id, "invalid:unknown_submitter", tx
        if self.tx_height(tx.id) is not None:
            return tx.id, "invalid:duplicate", tx
        if known is None:
            try:
                tx.check_signature(key)
            except AdmissionError:
                return tx.id, "invalid:bad_signature", tx
        return tx.id, "ok", tx

    # --- epochs -------------------------------------------------------------------------

    def epoch_at(self, height: int) -> int:
        """The epoch block ``height`` is in."""
        for number, starts in reversed(self._epochs):
            if starts <= height:
                return number
        return 0

    @property
    def latest_epoch(self) -> int:
        """The last epoch opened on the chain (it may start with the next block)."""
        return self._epochs[-1][0] if self._epochs else 0

    @property
    def current_epoch(self) -> int:
        """The epoch of the next block: what new transactions are sealed under."""
        return self.epoch_at(self.public_height + 1)

    def seal(self, tx: Transaction) -> Envelope:
        """``tx`` sealed under the current epoch's key (raises KeyUnavailable)."""
        epoch = self.current_epoch
        return Envelope.seal(tx, epoch=epoch, key=self._envelope_key(kind_class(tx.kind), epoch),
                             chain_id=self.chain_id)

    def _envelope_key(self, kind_class: str, epoch: int) -> AESGCM:
        return public_key(self.chain_id, epoch) if kind_class in PUBLIC_CLASSES else self._key(epoch)

    def _key(self, epoch: int) -> AESGCM:
        key = self.keys.aead(epoch)
        if key is None:
            raise KeyUnavailable(f"this member holds no key for epoch {epoch}: "
                                 f"{self.keys.unreadable.get(epoch, 'its grant is not applied yet')}")
        return key

    def open_envelope(self, data: bytes, height: int | None = None, *, opened: Transaction | None = None,
                      envelope: Envelope | None = None) -> tuple[Envelope, Transaction]:
        """Decode an envelope and open it, if it may be in block ``height`` (default: the next).

        Raises AdmissionError with the reason the ledger records (``malformed``,
        ``stale_epoch``, ``future_epoch``, ``undecryptable``, ``envelope_mismatch``), and
        KeyUnavailable if this member lacks the key of an epoch it should hold. ``opened``
        is the transaction inside, when the caller already opened and checked it; ``envelope``,
        ``data`` already decoded.
        """
        if envelope is None:  # else ``data`` decoded already
            try:
                envelope = Envelope.decode(data)
            except CodecError as exc:
                raise AdmissionError(f"malformed envelope: {exc}", reason="malformed") from exc
        current = self.epoch_at(self.public_height + 1 if height is None else height)
        if envelope.epoch > current:
            raise AdmissionError(f"envelope sealed under epoch {envelope.epoch}, ahead of {current}",
                                 reason="future_epoch")
        if envelope.epoch < current - 1:
            raise AdmissionError(f"envelope sealed under epoch {envelope.epoch}; epoch {current} is current",
                                 reason="stale_epoch")
        if opened is not None:
            return envelope, opened
        key = self._envelope_key(envelope.kind_class, envelope.epoch)
        try:
            return envelope, envelope.open(key, self.chain_id, self.rules)
        except CryptoError as exc:
            raise AdmissionError(str(exc), reason="undecryptable") from exc
        except CodecError as exc:
            reason = "envelope_mismatch" if exc.reason == "envelope_mismatch" else "malformed"
            raise AdmissionError(f"envelope holds no valid transaction: {exc}", reason=reason) from exc

    def epoch_grants(self) -> list[EpochGrant]:
        """Every epoch key granted on the chain after genesis, oldest first."""
        grants: dict[int, tuple[bytes, dict[str, bytes]]] = {}
        for epoch, check in self._db.execute("SELECT epoch, check_value FROM epochs WHERE epoch > 0"):
            grants[epoch] = (check, {})
        for epoch, member, sealed in self._db.execute("SELECT epoch, member, sealed FROM epoch_grants"):
            grants[epoch][1][member] = sealed
        return [EpochGrant(epoch, check, sealed) for epoch, (check, sealed) in sorted(grants.items())]

    def grant_recipients(self, epoch: int) -> set[str]:
        """The members the key of ``epoch`` was sealed to."""
        if epoch == 0:
            return set(self.governance.memberships[0].names)
        return {member for (member,) in self._db.execute("SELECT member FROM epoch_grants WHERE epoch = ?", (epoch,))}

    def epochs(self) -> list[dict[str, Any]]:
        """Each epoch: its number, first height, when and by whom (and which transaction) it was
        opened, and the members its key was sealed to."""
        columns = ("epoch", "starts", "time", "opened_by", "tx_id")
        rows = self._db.execute(f"SELECT {', '.join(columns)} FROM epochs ORDER BY epoch").fetchall()
        return [{**dict(zip(columns, row, strict=True)), "sealed_to": sorted(self.grant_recipients(row[0]))}
                for row in rows]

    def _apply_epoch(self, db: sqlite3.Connection, tx: Transaction, height: int, block_time: int) -> str:
        body = tx.body
        latest = db.execute("SELECT MAX(epoch) FROM epochs").fetchone()[0] or 0
        if body["epoch"] != latest + 1:
            return "invalid:stale_epoch"  # another grant opened that epoch first
        if set(body["sealed"]) != set(self.governance.at(height).names):
            return "invalid:grants"  # sealed to every current member, and to no one else
        db.execute("INSERT INTO epochs VALUES (?, ?, ?, ?, ?, ?)",
                   (body["epoch"], height + 1, block_time, body["check"], tx.submitter, tx.id))
        db.executemany("INSERT INTO epoch_grants VALUES (?, ?, ?)",
                       [(body["epoch"], member, sealed) for member, sealed in body["sealed"].items()])
        self.governance.lapse_history(db, height)
        return "ok"

    def tx_height(self, tx_id: bytes) -> int | None:
        row = self._db.execute("SELECT height FROM txs WHERE id = ? AND status = 'ok'", (tx_id,)).fetchone()
        return row[0] if row else None

    def block_txs(self, height: int) -> list[tuple[bytes, str]]:
        """(transaction id, status) of each entry of the applied block ``height``, in block order
        (an entry that could not be read is known by its envelope's id)."""
        return self._db.execute("SELECT id, status FROM txs WHERE height = ? ORDER BY position", (height,)).fetchall()

    def is_committed(self, tx_id: bytes) -> bool:
        return self.tx_height(tx_id) is not None

    def anchors(self, *, empi: str | None = None, record: bytes | None = None, institution: str | None = None,
                commitment: bytes | None = None, tx_id: bytes | None = None) -> list[dict[str, Any]]:
        """Committed anchors matching every filter given, oldest first, each with its patient's EMPI.

        ``empi`` selects the records of every enrolment that EMPI stands for now, through
        merges: after a merge either EMPI lists the records of both.
        """
        where, args = [], []
        for column, value in (("record", record), ("institution", institution), ("commitment", commitment),
                              ("tx_id", tx_id)):
            if value is not None:
                where.append(f"a.{column} = ?")
                args.append(value)
        if empi is not None:
            enrolments = self.empi.enrolments_of(empi)
            if not enrolments:
                return []
            where.append(f"a.patient IN ({', '.join('?' * len(enrolments))})")
            args.extend(enrolments)
        sql = (f"SELECT {', '.join('a.' + c for c in ANCHOR_COLUMNS)}, e.empi FROM anchors a "
               "LEFT JOIN enrolments e ON e.id = a.patient")
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._db.execute(sql + " ORDER BY a.height, a.rowid", args).fetchall()
        return [dict(zip((*ANCHOR_COLUMNS, "empi"), row, strict=True)) for row in rows]

    def anchored_positions(self, institution: str) -> dict[int, tuple[bytes, bytes, bytes]]:
        """Vault position -> (record id, commitment, entry hash) of every anchor ``institution`` committed."""
        rows = self._db.execute("SELECT position, record, commitment, entry FROM anchors WHERE institution = ?",
                                (institution,))
        return {position: (record, commitment, entry) for position, record, commitment, entry in rows}

    def actions(self, actor: bytes) -> list[dict[str, Any]]:
        """Every committed transaction a user (by pseudonym) acted in, oldest first."""
        columns = ("tx_id", "actor", "submitter", "kind", "time", "height")
        rows = self._db.execute(f"SELECT {', '.join(columns)} FROM actions WHERE actor = ? ORDER BY height, rowid",
                                (actor,)).fetchall()
        return [dict(zip(columns, row, strict=True)) for row in rows]

    def actor_of(self, tx_id: bytes) -> bytes:
        """The user pseudonym a committed transaction carries (empty: the node acted on its own)."""
        row = self._db.execute("SELECT actor FROM actions WHERE tx_id = ?", (tx_id,)).fetchone()
        return row[0] if row else b""

    def tx_kind(self, tx_id: bytes) -> str | None:
        """The kind of a committed transaction (None: not committed, or unreadable)."""
        row = self._db.execute("SELECT kind FROM txs WHERE id = ? AND status = 'ok'", (tx_id,)).fetchone()
        return row[0] if row else None

    def tx_status(self, tx_id: bytes) -> str | None:
        """``ok`` or ``invalid:<reason>`` once committed in a block; None before."""
        row = self._db.execute("SELECT status FROM txs WHERE id = ? ORDER BY status = 'ok' DESC LIMIT 1",
                               (tx_id,)).fetchone()
        return row[0] if row else None

    def highest_position(self, institution: str) -> int:
        row = self._db.execute("SELECT MAX(position) FROM anchors WHERE institution = ?", (institution,)).fetchone()
        return row[0] or 0

    def tx_count(self) -> int:
        count: int = self._db.execute("SELECT COUNT(*) FROM txs WHERE status = 'ok'").fetchone()[0]
        return count


class Admitted(Protocol):
    """The mempool's view of a committed block's entries, by envelope id: what it already holds
    need not be decoded, opened or checked again."""

    def get(self, envelope_id: bytes) -> Transaction | None:
        """The transaction inside, if it was opened from exactly these bytes and its signature checked."""

    def envelope(self, envelope_id: bytes) -> Envelope | None:
        """The envelope, decoded (or sealed) from exactly these bytes."""


def _decode(data: bytes) -> Envelope | None:
    """A payload entry's envelope, None if it does not decode (the sealed part records it)."""
    try:
        return Envelope.decode(data)
    except CodecError:
        return None


def _known_by_keys(members: Mapping[str, bytes], roles: Mapping[str, str]) -> Membership:
    """A membership known only by signing keys and roles (nothing is ever sealed to it)."""
    return Membership(0, 0, tuple(Member(name, roles.get(name, ""), key, b"", Address("localhost", 1))
                                  for name, key in members.items()))
