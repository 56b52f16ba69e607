"""The ledger state: what committed blocks mean, derived deterministically.

Every node applies the same committed blocks in the same order and gets the
same tables. A block's payload is opaque to consensus, so a leader can put
anything in it: a transaction that does not decode, is for another chain, is
not signed by its submitter or repeats an earlier one is recorded as
``invalid`` with its reason and otherwise ignored, the same way everywhere.

State is applied in one SQLite transaction per block together with the
applied height, so after a crash it resumes exactly at the first block it had
not applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .. import crypto
from ..consensus.types import Block
from ..errors import AdmissionError, CodecError, StoreError
from .sqlite import open_db, transaction
from .transactions import Transaction


_SCHEMA = """
CREATE TABLE IF NOT EXISTS txs (
    id BLOB PRIMARY KEY, height INTEGER NOT NULL, position INTEGER NOT NULL,
    kind TEXT NOT NULL, submitter TEXT, time INTEGER, status TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS txs_height ON txs(height);
CREATE TABLE IF NOT EXISTS applied (only INTEGER PRIMARY KEY CHECK (only = 0), height INTEGER NOT NULL);
"""


class LedgerState:
    def __init__(self, path: Path, chain_id: str, members: Mapping[str, bytes]) -> None:
        self.chain_id = chain_id
        self.members = dict(members)
        self._db = open_db(path, _SCHEMA, "ledger state")

    def close(self) -> None:
        self._db.close()

    @property
    def applied_height(self) -> int:
        row = self._db.execute("SELECT height FROM applied").fetchone()
        return row[0] if row else 0

    def apply(self, block: Block) -> list[Transaction]:
        """Apply one committed block (the next height); returns its valid transactions."""
        if block.height != self.applied_height + 1:
            raise StoreError(f"block {block.height} applied after height {self.applied_height}", reason="apply_gap")
        valid: list[Transaction] = []
        rows = []
        seen: set[bytes] = set()
        for position, data in enumerate(block.payload):
            tx_id = crypto.sha256(data)
            status, tx = self._classify(tx_id, data)
            if status == "ok" and tx_id in seen:
                status = "invalid:duplicate"
            seen.add(tx_id)
            if tx is not None and status == "ok":
                valid.append(tx)
            rows.append((tx_id, block.height, position, tx.kind if tx else "unknown",
                         tx.submitter if tx else None, tx.time if tx else None, status))
        with transaction(self._db, f"apply block {block.height}") as db:
            db.executemany("INSERT OR IGNORE INTO txs VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            db.execute("INSERT OR REPLACE INTO applied VALUES (0, ?)", (block.height,))
        return valid

    def _classify(self, tx_id: bytes, data: bytes) -> tuple[str, Transaction | None]:
        try:
            tx = Transaction.decode(data)
        except CodecError:
            return "invalid:malformed", None
        if tx.chain_id != self.chain_id:
            return "invalid:wrong_chain", tx
        key = self.members.get(tx.submitter)
        if key is None:
            return "invalid:unknown_submitter", tx
        if self.tx_height(tx_id) is not None:
            return "invalid:duplicate", tx
        try:
            tx.check_signature(key)
        except AdmissionError:
            return "invalid:bad_signature", tx
        return "ok", tx

    def tx_height(self, tx_id: bytes) -> int | None:
        row = self._db.execute("SELECT height FROM txs WHERE id = ? AND status = 'ok'", (tx_id,)).fetchone()
        return row[0] if row else None

    def is_committed(self, tx_id: bytes) -> bool:
        return self.tx_height(tx_id) is not None

    def tx_count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM txs WHERE status = 'ok'").fetchone()[0]
