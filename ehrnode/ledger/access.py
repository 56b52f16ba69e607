"""What happened to anchored records: access decisions, erasures and integrity alarms.

Theory of operation
-------------------
An owner decides every pull request for one of its records and commits the
decision before it serves anything, in an ``access.logs`` transaction with the
other decisions it made within a few milliseconds (``access.log``, one decision,
is what owners wrote before); refusals are committed too, with their reason. A
transaction's decisions are applied all together or not at all. The transaction carries the signed
request, and the chain checks what any node can check: the requester is a
member and signed the request (so no owner can log an access nobody asked
for), the request is addressed to the submitter and is for this chain, a
granted access is for a record the submitter anchored and has not erased, and
each request is decided once (its id is unique).

``record.erase`` is the owner's statement that it destroyed a record's data
keys; the anchor stays, so the record's history (and any leaked copy) can
still be checked against its commitment. ``integrity.alert`` is a requester's
statement that what an owner served under a committed access did not match
the anchor; it names the access (by its request id, or by the ``access.log``
that logged it alone), so only the member that was served can raise it, once
per access.

These tables are the audit trail: who read which record (the member, and its
pseudonym for the user who asked, with their role), when, for what, and on
what grounds, in chain order, the same on every node.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any

from .. import crypto
from ..config import LEDGER_RULES
from ..storage import transaction
from .requests import PullRequest
from .transactions import ALERTS_BY_REQUEST_SINCE

_ACCESSES = """ (
    request BLOB PRIMARY KEY, signed BLOB NOT NULL, record BLOB NOT NULL, owner TEXT NOT NULL, requester TEXT NOT NULL,
    user BLOB NOT NULL, user_role TEXT NOT NULL, purpose TEXT NOT NULL, decision TEXT NOT NULL, reason TEXT NOT NULL,
    consent BLOB NOT NULL,
    requested_at INTEGER NOT NULL, time INTEGER NOT NULL, height INTEGER NOT NULL, tx_id BLOB NOT NULL)"""
_ACCESS_INDEXES = tuple(f"CREATE INDEX IF NOT EXISTS accesses_{name} ON accesses({column})"
                        for name, column in (("record", "record"), ("requester", "requester"), ("tx", "tx_id")))
_INDEXES_SQL = ";\n".join(_ACCESS_INDEXES)
#: Made once the user columns exist (state from before users gains them on open).
_USER_INDEX = "CREATE INDEX IF NOT EXISTS accesses_user ON accesses(user)"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS accesses{_ACCESSES};
{_INDEXES_SQL};
CREATE TABLE IF NOT EXISTS erasures (
    record BLOB PRIMARY KEY, owner TEXT NOT NULL, reason BLOB NOT NULL, time INTEGER NOT NULL,
    height INTEGER NOT NULL, tx_id BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS alerts (
    access BLOB PRIMARY KEY, record BLOB NOT NULL, owner TEXT NOT NULL, reporter TEXT NOT NULL,
    received BLOB NOT NULL, time INTEGER NOT NULL, height INTEGER NOT NULL, tx_id BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS alerts_record ON alerts(record);
"""

#: How far a request's time may be from the block that logs its decision (owners accept requests
#: at most an hour old, and log them within seconds).
MAX_DECISION_DELAY_MS = 2 * 3600 * 1000

#: Columns after ``request`` and ``signed`` (the request id and the signed request's bytes).
ACCESS_COLUMNS = ("record", "owner", "requester", "user", "user_role", "purpose", "decision", "reason", "consent",
                  "requested_at", "time", "height", "tx_id")


class AccessLog:
    def __init__(self, db: sqlite3.Connection, chain_id: str, members: Mapping[str, bytes],
                 rules: int = LEDGER_RULES) -> None:
        self._db = db
        self._rules = rules  # before ALERTS_BY_REQUEST_SINCE, an alert names an access only by its access.log
        self._chain_id = chain_id
        self._members = members
        # State written before users existed has no user columns: add them (its requests named none).
        columns = {row[1] for row in db.execute("PRAGMA table_info(accesses)")}
        if "user" not in columns:
            db.execute("ALTER TABLE accesses ADD COLUMN user BLOB NOT NULL DEFAULT x''")
        if "user_role" not in columns:
            db.execute("ALTER TABLE accesses ADD COLUMN user_role TEXT NOT NULL DEFAULT ''")
        db.execute(_USER_INDEX)
        self._migrate_unique_tx(db)

    @staticmethod
    def _migrate_unique_tx(db: sqlite3.Connection) -> None:
        """State written before decisions were batched holds at most one access per transaction
        (``tx_id`` UNIQUE): rebuild the table without that, rows in the same order."""
        sql = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'accesses'").fetchone()[0]
        if "UNIQUE" not in sql:
            return
        columns = ", ".join(("request", "signed", *ACCESS_COLUMNS))
        with transaction(db, "rebuild the access log without one access per transaction"):
            db.execute(f"CREATE TABLE accesses_batched{_ACCESSES}")
            db.execute(f"INSERT INTO accesses_batched ({columns}) SELECT {columns} FROM accesses ORDER BY rowid")
            db.execute("DROP TABLE accesses")
            db.execute("ALTER TABLE accesses_batched RENAME TO accesses")
            for index in (*_ACCESS_INDEXES, _USER_INDEX):
                db.execute(index)

    # --- applying (inside the block's transaction) ---------------------------------------

    def apply_decisions(self, db: sqlite3.Connection, decisions: list[dict[str, Any]], submitter: str, height: int,
                        time_ms: int, tx_id: bytes, block_time: int) -> str:
        """Every decision of one transaction, or none: the first refused refuses the whole of it."""
        status = "ok"
        db.execute("SAVEPOINT decisions")
        for body in decisions:
            status = self.apply_access(db, body, submitter, height, time_ms, tx_id, block_time)
            if status != "ok":
                db.execute("ROLLBACK TO decisions")
                break
        db.execute("RELEASE decisions")
        return status

    def apply_access(self, db: sqlite3.Connection, body: dict[str, Any], submitter: str, height: int, time_ms: int,
                     tx_id: bytes, block_time: int) -> str:
        request = PullRequest.decode(body["request"])
        request_id = crypto.sha256(body["request"])
        if request.chain_id != self._chain_id:
            return "invalid:wrong_chain"
        if request.owner != submitter:
            return "invalid:not_addressed"  # an owner decides only requests made to it
        key = self._members.get(request.requester)
        if key is None:
            return "invalid:unknown_requester"
        if not request.signature_ok(key):
            return "invalid:bad_request_signature"  # nobody can be logged as asking without having asked
        if abs(block_time - request.time) > MAX_DECISION_DELAY_MS:
            return "invalid:stale_request"  # an owner cannot log, long after, a request it never decided then
        if db.execute("SELECT 1 FROM accesses WHERE request = ?", (request_id,)).fetchone():
            return "invalid:duplicate_request"
        if body["decision"] == "granted":
            owner = db.execute("SELECT institution FROM anchors WHERE record = ?", (request.record,)).fetchone()
            if owner is None or owner[0] != submitter:
                return "invalid:not_owner"  # only the owner grants access to a record, and only to its own
            if db.execute("SELECT 1 FROM erasures WHERE record = ?", (request.record,)).fetchone():
                return "invalid:erased"
        db.execute(f"INSERT INTO accesses (request, signed, {', '.join(ACCESS_COLUMNS)}) "
                   f"VALUES (?, ?, {', '.join('?' * len(ACCESS_COLUMNS))})", (
            request_id, body["request"], request.record, submitter, request.requester, request.user, request.role,
            request.purpose,
            body["decision"], body["reason"], body["consent"], request.time, time_ms, height, tx_id,
        ))
        return "ok"

    def apply_erase(self, db: sqlite3.Connection, body: dict[str, Any], submitter: str, height: int, time_ms: int,
                    tx_id: bytes) -> str:
        owner = db.execute("SELECT institution FROM anchors WHERE record = ?", (body["record"],)).fetchone()
        if owner is None:
            return "invalid:unknown_record"
        if owner[0] != submitter:
            return "invalid:not_owner"
        if db.execute("SELECT 1 FROM erasures WHERE record = ?", (body["record"],)).fetchone():
            return "invalid:already_erased"
        db.execute("INSERT INTO erasures VALUES (?, ?, ?, ?, ?, ?)",
                   (body["record"], submitter, body["reason"], time_ms, height, tx_id))
        return "ok"

    def apply_alert(self, db: sqlite3.Connection, body: dict[str, Any], submitter: str, height: int, time_ms: int,
                    tx_id: bytes) -> str:
        access = self.named(body["access"])  # (``db`` is this log's own connection, in the block's transaction)
        if access is None or access["decision"] != "granted":
            return "invalid:unknown_access"
        if access["requester"] != submitter:
            return "invalid:not_requester"  # only the member that was served can say what it received
        if access["record"] != body["record"] or access["owner"] != body["owner"]:
            return "invalid:mismatch"
        if db.execute("SELECT 1 FROM alerts WHERE access IN (?, ?)", (access["request"], access["tx_id"])).fetchone():
            return "invalid:duplicate_alert"  # one alarm per access, whichever way it was named
        db.execute("INSERT INTO alerts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (body["access"], access["record"], access["owner"], submitter, body["received"], time_ms, height,
                    tx_id))
        return "ok"

    # --- reading -------------------------------------------------------------------------

    def _select(self, table: str, columns: tuple[str, ...], records: list[bytes] | None,
                **equal: Any) -> list[dict[str, Any]]:
        """Rows of ``table`` for ``records`` (None: any) whose columns equal every value given, in chain order."""
        where, args = [], []
        if records is not None:
            if not records:
                return []
            where.append(f"record IN ({', '.join('?' * len(records))})")
            args.extend(records)
        for column, value in equal.items():
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = f"SELECT {', '.join(columns)} FROM {table}" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self._db.execute(sql + " ORDER BY height, rowid", args).fetchall()
        return [dict(zip(columns, row, strict=True)) for row in rows]

    def accesses(self, *, records: list[bytes] | None = None, request: bytes | None = None,
                 requester: str | None = None, owner: str | None = None, user: bytes | None = None,
                 decision: str | None = None) -> list[dict[str, Any]]:
        """Committed access decisions matching every filter given, in chain order."""
        return self._select("accesses", ("request", *ACCESS_COLUMNS), records, request=request, requester=requester,
                            owner=owner, user=user, decision=decision)

    def named(self, access: bytes) -> dict[str, Any] | None:
        """The access an alert names: by its request id (ledger rules 2 on), or by the id of an
        access.log that logged it alone."""
        found = (self.accesses(request=access) if self._rules >= ALERTS_BY_REQUEST_SINCE else []) or self._select(
            "accesses", ("request", *ACCESS_COLUMNS), None, tx_id=access)
        return found[0] if len(found) == 1 else None

    def erasure(self, record: bytes) -> dict[str, Any] | None:
        found = self.erasures(records=[record])
        return found[0] if found else None

    def erasures(self, *, records: list[bytes] | None = None, owner: str | None = None) -> list[dict[str, Any]]:
        return self._select("erasures", ("record", "owner", "reason", "time", "height", "tx_id"), records,
                            owner=owner)

    def alerts(self, *, records: list[bytes] | None = None) -> list[dict[str, Any]]:
        return self._select("alerts", ("access", "record", "owner", "reporter", "received", "time", "height",
                                       "tx_id"), records)
