"""Requests to name a user behind a pseudonym, and the institutions' answers, on chain.

Theory of operation
-------------------
Only the institution that holds a user pseudonym's key and its user list can
say who the pseudonym is. Another member (the regulator, typically) that needs
to know asks on chain: ``whois.request`` names the institution, the pseudonym
and the case it is asked for, and carries the asking user's own pseudonym as
its actor. The institution answers with ``whois.answer``: the user's name and
role sealed to the asker's X25519 key (bound to the request's id), or the
reason it does not (``policy``, ``not_found``). Both are on every member's
chain, so every such disclosure, and every attempt, is audited like an access
to a record; what the name is, only the asker can read.

The chain checks that a request is made to an institution other than the
asker, and that an answer comes from the institution asked, once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS whois (
    request BLOB PRIMARY KEY, asker TEXT NOT NULL, actor BLOB NOT NULL, institution TEXT NOT NULL,
    pseudonym BLOB NOT NULL, case_ref TEXT NOT NULL, time INTEGER NOT NULL, height INTEGER NOT NULL,
    answer BLOB, reason TEXT, sealed BLOB, answered_height INTEGER);
CREATE INDEX IF NOT EXISTS whois_pseudonym ON whois(pseudonym);
"""

COLUMNS = ("request", "asker", "actor", "institution", "pseudonym", "case_ref", "time", "height", "answer",
           "reason", "sealed", "answered_height")


class WhoisLog:
    def __init__(self, db: sqlite3.Connection, roles: Mapping[str, str]) -> None:
        self._db = db
        self._roles = roles

    def apply_request(self, db: sqlite3.Connection, body: dict[str, Any], submitter: str, actor: bytes,
                      height: int, time_ms: int, tx_id: bytes) -> str:
        if self._roles.get(body["institution"]) != "institution":
            return "invalid:unknown_institution"
        if body["institution"] == submitter:
            return "invalid:own_institution"  # an institution resolves its own pseudonyms locally
        db.execute("INSERT INTO whois (request, asker, actor, institution, pseudonym, case_ref, time, height) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (tx_id, submitter, actor, body["institution"], body["pseudonym"], body["case"], time_ms, height))
        return "ok"

    def apply_answer(self, db: sqlite3.Connection, body: dict[str, Any], submitter: str, height: int,
                     tx_id: bytes) -> str:
        row = db.execute("SELECT institution, answer FROM whois WHERE request = ?", (body["request"],)).fetchone()
        if row is None:
            return "invalid:unknown_request"
        if row[0] != submitter:
            return "invalid:not_addressed"
        if row[1] is not None:
            return "invalid:already_answered"
        db.execute("UPDATE whois SET answer = ?, reason = ?, sealed = ?, answered_height = ? WHERE request = ?",
                   (tx_id, body["reason"], body["sealed"], height, body["request"]))
        return "ok"

    def requests(self, *, request: bytes | None = None, pseudonym: bytes | None = None,
                 institution: str | None = None, unanswered: bool = False) -> list[dict[str, Any]]:
        where, args = [], []
        for column, value in (("request", request), ("pseudonym", pseudonym), ("institution", institution)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if unanswered:
            where.append("answer IS NULL")
        sql = f"SELECT {', '.join(COLUMNS)} FROM whois" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self._db.execute(sql + " ORDER BY height, rowid", args).fetchall()
        return [dict(zip(COLUMNS, row, strict=True)) for row in rows]
