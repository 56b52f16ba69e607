"""How the node's SQLite files are opened and written: the block store and ledger state, the
vault, the user store.

WAL with ``synchronous=NORMAL``: a process crash loses nothing and a power cut may lose
the last few commits but never corrupts the file. That is enough for blocks and ledger
state: committed blocks are fetched again from peers on restart and the state is derived
from them. What must never be lost, the votes, lives in the safety store, which syncs
every write.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import StoreError


def open_db(path: Path, schema: str, what: str, *, durable: bool = False,
            any_thread: bool = False) -> sqlite3.Connection:
    """Open (creating if needed) ``path`` with ``schema``; raises StoreError naming ``what``.

    ``durable`` syncs every commit (``synchronous=FULL``), for data that exists nowhere
    else, such as the vault. ``any_thread`` lets worker threads use the connection; the
    caller then serializes access itself.
    """
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=not any_thread)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        db.executescript(schema)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {what} {path}: {exc}") from exc
    return db


@contextmanager
def transaction(db: sqlite3.Connection, what: str) -> Iterator[sqlite3.Connection]:
    """One write transaction: all of it or none of it; SQLite failures become StoreError."""
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot {what}: {exc}") from exc
