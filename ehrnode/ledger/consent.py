"""Patient consent on chain: grants and revocations by EMPI, and the decision they add up to.

Theory of operation
-------------------
A patient's institution records the patient's consent choices as signed
transactions: ``consent.grant`` and ``consent.revoke``, each naming the EMPI,
the grantee (a member, or ``*`` for all), the purposes of use and the
resource types it covers (``*`` for all), and optionally an end time. Only an
institution that has the patient enrolled may record them.

To decide whether a grantee may read a record of type T for purpose P at time
t, the entries of the patient (under its EMPI and every EMPI merged into it)
that cover (grantee, P, T) and are still in force at t are taken in chain
order, and the last one wins: a grant allows, a revocation refuses. With none,
the consortium's default applies (the caller passes it: it is policy, not
state). The decision names the entry it rests on, so an access log can cite it.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from .transactions import CONSENT_PURPOSES

__all__ = ["CONSENT_PURPOSES", "ConsentRegistry", "Decision", "SCHEMA"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS consents (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, empi TEXT NOT NULL, action TEXT NOT NULL, grantor TEXT NOT NULL,
    grantee TEXT NOT NULL, purposes TEXT NOT NULL, scope TEXT NOT NULL, until INTEGER NOT NULL,
    height INTEGER NOT NULL, time INTEGER NOT NULL, tx_id BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS consents_empi ON consents(empi);
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # "granted", "revoked", "expired" never: expired entries do not count; "default"
    tx_id: bytes | None  # the entry it rests on (None: the default)


class ConsentRegistry:
    def __init__(self, db: sqlite3.Connection, empi: Any) -> None:
        self._db = db
        self._empi = empi  # the EMPI registry, for merges

    def apply(self, db: sqlite3.Connection, action: str, body: dict[str, Any], submitter: str, height: int,
              time_ms: int, tx_id: bytes) -> str:
        current = self._empi.resolve(db, body["empi"])
        if current is None:
            return "invalid:unknown"
        if not db.execute("SELECT 1 FROM enrolments WHERE empi = ? AND institution = ? LIMIT 1",
                          (current, submitter)).fetchone():
            return "invalid:not_owner"  # only an institution that has this patient records its consent
        db.execute(
            "INSERT INTO consents (empi, action, grantor, grantee, purposes, scope, until, height, time, tx_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (body["empi"], action, submitter, body["grantee"], json.dumps(sorted(body["purposes"])),
             json.dumps(sorted(body["scope"])), body["until"], height, time_ms, tx_id),
        )
        return "ok"

    def entries(self, empi: str) -> list[dict[str, Any]]:
        aliases = self._empi.aliases(empi)
        if not aliases:
            return []
        rows = self._db.execute(
            "SELECT empi, action, grantor, grantee, purposes, scope, until, height, time, tx_id FROM consents "
            f"WHERE empi IN ({', '.join('?' * len(aliases))}) ORDER BY height, seq", aliases).fetchall()
        return [{
            "empi": e, "action": a, "grantor": g, "grantee": ge, "purposes": json.loads(p), "scope": json.loads(s),
            "until": u or None, "height": h, "time": t, "tx_id": tx.hex(),
        } for e, a, g, ge, p, s, u, h, t, tx in rows]

    def decide(self, empi: str, grantee: str, purpose: str, resource_type: str, now_ms: int, *,
               default: bool) -> Decision:
        """Whether ``grantee`` may read a ``resource_type`` record of ``empi`` for ``purpose`` now."""
        decision = Decision(default, "default", None)
        for entry in self.entries(empi):
            if entry["grantee"] not in ("*", grantee):
                continue
            if "*" not in entry["purposes"] and purpose not in entry["purposes"]:
                continue
            if "*" not in entry["scope"] and resource_type not in entry["scope"]:
                continue
            if entry["until"] is not None and entry["until"] <= now_ms:
                continue
            granted = entry["action"] == "grant"
            decision = Decision(granted, "granted" if granted else "revoked", bytes.fromhex(entry["tx_id"]))
        return decision
