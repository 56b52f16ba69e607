"""Where blocks live once the consensus core has accepted them.

Two implementations of one interface: :class:`MemoryBlockStore` for the
simulator and :class:`SqliteBlockStore` (WAL) for the daemon.
Both keep every verified block, the committed chain by height and the QC that
committed the newest part of it, and both refuse to change a committed height:
a commit that disagrees with one already stored raises StoreError, because it
would mean the chain forked.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Protocol

from .. import codec
from ..consensus.types import Block, EpochEnd, QuorumCert, Recovery, ValidatorSet
from ..errors import CodecError, StoreError
from ..storage import open_db, transaction

_MAX_STORED_BLOCK = 64 * 1024 * 1024


class BlockStore(Protocol):
    def put_block(self, block: Block) -> None: ...

    def commit(self, blocks: tuple[Block, ...], proof: QuorumCert) -> None: ...

    def get_block(self, block_id: bytes) -> Block | None: ...

    def block_at(self, height: int) -> Block | None: ...

    def committed_height(self) -> int: ...

    def recovery(self) -> Recovery | None: ...


def _check_commit(height_of_head: int, blocks: tuple[Block, ...]) -> None:
    expected = height_of_head + 1
    for block in blocks:
        if block.height != expected:
            raise StoreError(
                f"commit of height {block.height} does not follow committed height {expected - 1}", reason="commit_gap"
            )
        expected += 1


class MemoryBlockStore:
    def __init__(self, vset: ValidatorSet) -> None:
        self._genesis = vset.genesis_block
        self._blocks: dict[bytes, Block] = {}
        self._by_height: list[Block] = [self._genesis]
        self._proof: QuorumCert | None = None

    def put_block(self, block: Block) -> None:
        self._blocks.setdefault(block.id, block)

    def commit(self, blocks: tuple[Block, ...], proof: QuorumCert) -> None:
        _check_commit(self.committed_height(), blocks)
        for block in blocks:
            self._blocks.setdefault(block.id, block)
            self._by_height.append(block)
        self._proof = proof

    def get_block(self, block_id: bytes) -> Block | None:
        return self._blocks.get(block_id)

    def block_at(self, height: int) -> Block | None:
        return self._by_height[height] if 0 <= height < len(self._by_height) else None

    def committed_height(self) -> int:
        return len(self._by_height) - 1

    def recovery(self) -> Recovery | None:
        root = self._by_height[-1]
        pending = [b for b in self._blocks.values() if b.height > root.height]
        return Recovery(root, pending, self._proof)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (
    id BLOB PRIMARY KEY, height INTEGER NOT NULL, round INTEGER NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS blocks_height ON blocks(height);
CREATE TABLE IF NOT EXISTS committed (height INTEGER PRIMARY KEY, id BLOB NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS commit_proof (only INTEGER PRIMARY KEY CHECK (only = 0), qc BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS epoch_ends (epoch INTEGER PRIMARY KEY, value BLOB NOT NULL);
"""


class SqliteBlockStore:
    """Blocks in SQLite (see :mod:`ehrnode.storage` for durability). Every write is one transaction."""

    def __init__(self, path: Path, vset: ValidatorSet) -> None:
        self._genesis = vset.genesis_block
        self._db = open_db(path, _SCHEMA, "block store")
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'genesis'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('genesis', ?)", (vset.genesis_id,))
            elif row[0] != vset.genesis_id:
                raise StoreError(f"{path} belongs to another chain (genesis differs)", reason="wrong_chain")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open block store {path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def put_block(self, block: Block) -> None:
        try:
            self._db.execute(
                "INSERT OR IGNORE INTO blocks VALUES (?, ?, ?, ?)",
                (block.id, block.height, block.round, codec.encode(block.to_wire())),
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot store block: {exc}") from exc

    def commit(self, blocks: tuple[Block, ...], proof: QuorumCert, ended: EpochEnd | None = None) -> None:
        """Commit ``blocks`` (certified by ``proof``); ``ended``: the last of them ended its epoch,
        kept to prove it to validators still in that epoch."""
        with transaction(self._db, "commit blocks") as db:
            _check_commit(self.committed_height(), blocks)
            if ended is not None:
                db.execute("INSERT OR REPLACE INTO epoch_ends VALUES (?, ?)", (ended.last.epoch, codec.encode({
                    "last": ended.last.to_wire(), "tail": [b.to_wire() for b in ended.tail],
                    "proof": ended.proof.to_wire()})))
            for block in blocks:
                db.execute(
                    "INSERT OR IGNORE INTO blocks VALUES (?, ?, ?, ?)",
                    (block.id, block.height, block.round, codec.encode(block.to_wire())),
                )
                db.execute("INSERT INTO committed VALUES (?, ?)", (block.height, block.id))
            db.execute("INSERT OR REPLACE INTO commit_proof VALUES (0, ?)", (codec.encode(proof.to_wire()),))
            # Forks that can no longer commit are dead weight. Only the heights committed now can
            # hold any: a block is stored only above the committed root (its parent known), and
            # the commits before dropped the rest. Scanning every height would make each commit's
            # work grow with the chain (half a second at 300,000 blocks).
            db.execute(
                "DELETE FROM blocks WHERE height BETWEEN ? AND ? AND id NOT IN (SELECT id FROM committed)",
                (blocks[0].height, blocks[-1].height),
            )

    def _decode_block(self, block_id: bytes, body: bytes) -> Block:
        try:
            block = Block.from_wire(codec.decode(body, max_size=_MAX_STORED_BLOCK))
        except CodecError as exc:
            raise StoreError(f"stored block {block_id.hex()} is corrupt: {exc}", reason="corrupt") from exc
        if block.id != block_id:
            raise StoreError(f"stored block {block_id.hex()} does not hash to its id", reason="corrupt")
        return block

    def get_block(self, block_id: bytes) -> Block | None:
        if block_id == self._genesis.id:
            return self._genesis
        row = self._db.execute("SELECT body FROM blocks WHERE id = ?", (block_id,)).fetchone()
        return None if row is None else self._decode_block(block_id, row[0])

    def block_at(self, height: int) -> Block | None:
        if height == 0:
            return self._genesis
        row = self._db.execute(
            "SELECT b.id, b.body FROM committed c JOIN blocks b ON b.id = c.id WHERE c.height = ?", (height,)
        ).fetchone()
        return None if row is None else self._decode_block(row[0], row[1])

    def committed_height(self) -> int:
        row = self._db.execute("SELECT MAX(height) FROM committed").fetchone()
        return row[0] or 0

    def epoch_end(self, epoch: int) -> EpochEnd | None:
        """How consensus epoch ``epoch`` ended, if it has."""
        row = self._db.execute("SELECT value FROM epoch_ends WHERE epoch = ?", (epoch,)).fetchone()
        if row is None:
            return None
        try:
            value = codec.decode(row[0], max_size=_MAX_STORED_BLOCK)
            return EpochEnd(Block.from_wire(value["last"]), tuple(Block.from_wire(b) for b in value["tail"]),
                            QuorumCert.from_wire(value["proof"]))
        except (CodecError, KeyError, TypeError) as exc:
            raise StoreError(f"stored end of epoch {epoch} is corrupt: {exc}", reason="corrupt") from exc

    def recovery(self) -> Recovery | None:
        height = self.committed_height()
        root = self.block_at(height)
        if root is None:
            raise StoreError(f"committed block at height {height} is missing", reason="corrupt")
        pending = [
            self._decode_block(bid, body)
            for bid, body in self._db.execute("SELECT id, body FROM blocks WHERE height > ?", (height,))
        ]
        row = self._db.execute("SELECT qc FROM commit_proof").fetchone()
        proof = None
        if row is not None:
            try:
                proof = QuorumCert.from_wire(codec.decode(row[0]))
            except CodecError as exc:
                raise StoreError(f"stored commit proof is corrupt: {exc}", reason="corrupt") from exc
        return Recovery(root, pending, proof)
