"""Who asked for how many OPRF evaluations: the chain's count that bounds and shows guessing.

Before the holders of the OPRF key evaluate anything for a member, the member commits an
``empi.oprf_batch`` transaction: the round, how many values, and a digest of the blinded
points it will send. A holder answers only a batch it finds here, from the peer that asks,
with the same points, and only while the member's count for the batch's day (UTC, by block
time) is within the holder's daily quota. Every holder reads the same count, so the quota is
the same at every honest holder; and a member that starts guessing leaves its batches, each
with its size, on the chain for the regulator's audit.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from .transactions import DAY_MS, Transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS oprf_batches (
    tx_id BLOB PRIMARY KEY, requester TEXT NOT NULL, round INTEGER NOT NULL, size INTEGER NOT NULL,
    digest BLOB NOT NULL, day INTEGER NOT NULL, cumulative INTEGER NOT NULL, height INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS oprf_batches_requester ON oprf_batches(requester, day);
"""

_COLUMNS = ("tx_id", "requester", "round", "size", "digest", "day", "cumulative", "height")


class OprfUsage:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def apply(self, db: sqlite3.Connection, tx: Transaction, height: int, block_time: int) -> str:
        body = tx.body
        # Rounds completed by this block: whether the public parts of later blocks were applied
        # already (a node catching up applies them first) must not change the answer.
        row = db.execute("SELECT MAX(round) FROM oprf_rounds WHERE status = 'complete' AND closed <= ?",
                         (height,)).fetchone()
        if row[0] is None or row[0] != body["round"]:
            return "invalid:not_the_current_round"   # only the latest key's holders answer
        day = block_time - block_time % DAY_MS
        used = db.execute("SELECT COALESCE(MAX(cumulative), 0) FROM oprf_batches WHERE requester = ? AND day = ?",
                          (tx.submitter, day)).fetchone()[0]
        db.execute(f"INSERT INTO oprf_batches VALUES ({', '.join('?' * len(_COLUMNS))})", (
            tx.id, tx.submitter, body["round"], body["size"], body["digest"], day, used + body["size"], height))
        return "ok"

    def batch(self, tx_id: bytes) -> dict[str, Any] | None:
        row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM oprf_batches WHERE tx_id = ?", (tx_id,)).fetchone()
        return dict(zip(_COLUMNS, row, strict=True)) if row else None

    def totals(self, *, day: int | None = None) -> list[dict[str, Any]]:
        """Per requester and day: batches and evaluations (newest day first)."""
        where, args = ("WHERE day = ?", (day,)) if day is not None else ("", ())
        return [{"requester": r, "day": d, "batches": b, "evaluations": e} for r, d, b, e in self._db.execute(
            f"SELECT requester, day, COUNT(*), SUM(size) FROM oprf_batches {where} GROUP BY requester, day "
            "ORDER BY day DESC, requester", args)]
