"""Patient consent on chain: grants and revocations by EMPI, and the decision they add up to.

Theory of operation
-------------------
A patient's institution records the patient's consent choices as signed
transactions: ``consent.grant`` and ``consent.revoke``, each naming the EMPI,
the grantee (a member, or ``*`` for all), the purposes of use and the
resource types it covers (``*`` for all), and optionally an end time.

Who may record: only a *holder* of the patient, an institution that has
anchored at least one record of an enrolment under the EMPI. Enrolling a
patient, or claiming one, is not enough: the EMPI registry only joins
institutions' enrolments with their agreement (:mod:`.empi_registry`), and the
records are what consent is about.

What decides a pull of a record held by institution H, for grantee G, purpose
P and resource type T at time t: the entries of the patient (under its EMPI
and every EMPI merged into it) that cover (G, P, T) and are in force at t are
grouped by the holder that recorded them, and each holder's last entry is its
stance.

1. If any holder's stance is a revocation, the pull is refused: a revocation
   stays in force until the holder that recorded it grants again, and no other
   holder's grant undoes it (the strictest choice wins).
2. Otherwise, if H's own stance is a grant, the pull is allowed: only the
   custodian of a record can open it; another holder's grant covers that
   holder's records, not H's.
3. Otherwise the consortium's default applies (the caller passes it: it is
   policy, not state).

The decision names the entry it rests on, so an access log can cite it.
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
        if not db.execute("SELECT 1 FROM anchors a JOIN enrolments e ON e.id = a.patient "
                          "WHERE e.empi = ? AND a.institution = ? LIMIT 1", (current, submitter)).fetchone():
            return "invalid:not_holder"  # only an institution holding this patient's records records consent
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

    def decide(self, empi: str, grantee: str, purpose: str, resource_type: str, now_ms: int, *, holder: str,
               default: bool) -> Decision:
        """Whether ``grantee`` may read a ``resource_type`` record ``holder`` holds of ``empi``, for
        ``purpose``, now (the rule in the module docstring)."""
        stances: dict[str, tuple[int, dict[str, Any]]] = {}
        for order, entry in enumerate(self.entries(empi)):
            if entry["grantee"] not in ("*", grantee):
                continue
            if "*" not in entry["purposes"] and purpose not in entry["purposes"]:
                continue
            if "*" not in entry["scope"] and resource_type not in entry["scope"]:
                continue
            if entry["until"] is not None and entry["until"] <= now_ms:
                continue
            stances[entry["grantor"]] = (order, entry)  # chain order: each holder's last one stands
        revoked = [stance for stance in stances.values() if stance[1]["action"] == "revoke"]
        if revoked:
            return Decision(False, "revoked", bytes.fromhex(max(revoked)[1]["tx_id"]))
        own = stances.get(holder)
        if own is not None:
            return Decision(True, "granted", bytes.fromhex(own[1]["tx_id"]))
        return Decision(default, "default", None)
