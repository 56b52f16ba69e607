"""What happened to anchored records: access decisions, erasures and integrity alarms.

Theory of operation
-------------------
An owner decides every pull request for one of its records and commits the
decision as an ``access.log`` transaction before it serves anything; refusals
are committed too, with their reason. The chain checks what any node can
check: the owner is who it claims to be (a granted access is for a record the
submitter anchored, and not erased), each request is decided once (its id is
unique), and the requester is a member.

``record.erase`` is the owner's statement that it destroyed a record's data
keys; the anchor stays, so the record's history (and any leaked copy) can
still be checked against its commitment. ``integrity.alert`` is a requester's
statement that what an owner served under a committed access did not match
the anchor; it names the access, so only the member that was served can
raise it, once per access.

These tables are the audit trail: who read which record, when, for what, and
on what grounds, in chain order, the same on every node.
"""

from __future__ import annotations

import sqlite3
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS accesses (
    request BLOB PRIMARY KEY, record BLOB NOT NULL, owner TEXT NOT NULL, requester TEXT NOT NULL,
    purpose TEXT NOT NULL, decision TEXT NOT NULL, reason TEXT NOT NULL, consent BLOB NOT NULL,
    requested_at INTEGER NOT NULL, time INTEGER NOT NULL, height INTEGER NOT NULL, tx_id BLOB NOT NULL UNIQUE);
CREATE INDEX IF NOT EXISTS accesses_record ON accesses(record);
CREATE INDEX IF NOT EXISTS accesses_requester ON accesses(requester);
CREATE TABLE IF NOT EXISTS erasures (
    record BLOB PRIMARY KEY, owner TEXT NOT NULL, reason BLOB NOT NULL, time INTEGER NOT NULL,
    height INTEGER NOT NULL, tx_id BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS alerts (
    access BLOB PRIMARY KEY, record BLOB NOT NULL, owner TEXT NOT NULL, reporter TEXT NOT NULL,
    received BLOB NOT NULL, time INTEGER NOT NULL, height INTEGER NOT NULL, tx_id BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS alerts_record ON alerts(record);
"""

ACCESS_COLUMNS = ("request", "record", "owner", "requester", "purpose", "decision", "reason", "consent",
                  "requested_at", "time", "height", "tx_id")


class AccessLog:
    def __init__(self, db: sqlite3.Connection, members: set[str]) -> None:
        self._db = db
        self._members = members

    # --- applying (inside the block's transaction) ---------------------------------------

    def apply_access(self, db: sqlite3.Connection, body: dict[str, Any], submitter: str, height: int, time_ms: int,
                     tx_id: bytes) -> str:
        if body["requester"] not in self._members:
            return "invalid:unknown_requester"
        if db.execute("SELECT 1 FROM accesses WHERE request = ?", (body["request"],)).fetchone():
            return "invalid:duplicate_request"
        if body["decision"] == "granted":
            owner = db.execute("SELECT institution FROM anchors WHERE record = ?", (body["record"],)).fetchone()
            if owner is None or owner[0] != submitter:
                return "invalid:not_owner"  # only the owner grants access to a record, and only to its own
            if db.execute("SELECT 1 FROM erasures WHERE record = ?", (body["record"],)).fetchone():
                return "invalid:erased"
        db.execute(f"INSERT INTO accesses VALUES ({', '.join('?' * len(ACCESS_COLUMNS))})", (
            body["request"], body["record"], submitter, body["requester"], body["purpose"], body["decision"],
            body["reason"], body["consent"], body["requested_at"], time_ms, height, tx_id,
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
        access = db.execute("SELECT record, owner, requester, decision FROM accesses WHERE tx_id = ?",
                            (body["access"],)).fetchone()
        if access is None or access[3] != "granted":
            return "invalid:unknown_access"
        record, owner, requester, _ = access
        if requester != submitter:
            return "invalid:not_requester"  # only the member that was served can say what it received
        if record != body["record"] or owner != body["owner"]:
            return "invalid:mismatch"
        if db.execute("SELECT 1 FROM alerts WHERE access = ?", (body["access"],)).fetchone():
            return "invalid:duplicate_alert"
        db.execute("INSERT INTO alerts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (body["access"], record, owner, submitter, body["received"], time_ms, height, tx_id))
        return "ok"

    # --- reading -------------------------------------------------------------------------

    def accesses(self, *, records: list[bytes] | None = None, request: bytes | None = None,
                 requester: str | None = None, owner: str | None = None,
                 decision: str | None = None) -> list[dict[str, Any]]:
        """Committed access decisions matching every filter given, in chain order."""
        where, args = [], []
        if records is not None:
            if not records:
                return []
            where.append(f"record IN ({', '.join('?' * len(records))})")
            args.extend(records)
        for column, value in (("request", request), ("requester", requester), ("owner", owner),
                              ("decision", decision)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = f"SELECT {', '.join(ACCESS_COLUMNS)} FROM accesses"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._db.execute(sql + " ORDER BY height, rowid", args).fetchall()
        return [dict(zip(ACCESS_COLUMNS, row, strict=True)) for row in rows]

    def erasure(self, record: bytes) -> dict[str, Any] | None:
        row = self._db.execute("SELECT owner, reason, time, height, tx_id FROM erasures WHERE record = ?",
                               (record,)).fetchone()
        if row is None:
            return None
        return {"record": record, "owner": row[0], "reason": row[1], "time": row[2], "height": row[3],
                "tx_id": row[4]}

    def erasures(self, *, records: list[bytes] | None = None, owner: str | None = None) -> list[dict[str, Any]]:
        where, args = [], []
        if records is not None:
            if not records:
                return []
            where.append(f"record IN ({', '.join('?' * len(records))})")
            args.extend(records)
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        sql = "SELECT record, owner, reason, time, height, tx_id FROM erasures"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._db.execute(sql + " ORDER BY height, rowid", args).fetchall()
        return [dict(zip(("record", "owner", "reason", "time", "height", "tx_id"), r, strict=True)) for r in rows]

    def alerts(self, *, records: list[bytes] | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT access, record, owner, reporter, received, time, height, tx_id FROM alerts", []
        if records is not None:
            if not records:
                return []
            sql += f" WHERE record IN ({', '.join('?' * len(records))})"
            args = list(records)
        rows = self._db.execute(sql + " ORDER BY height, rowid", args).fetchall()
        return [dict(zip(("access", "record", "owner", "reporter", "received", "time", "height", "tx_id"), r,
                         strict=True)) for r in rows]
