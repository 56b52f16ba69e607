"""The ledger's one boundary with consensus: hand it committed blocks, learn what they changed.

The consensus core decides which blocks are committed; :class:`Chain` stores and applies them.
:meth:`Chain.commit` writes the blocks to the block store, applies them to the ledger state and
answers with each block's valid transactions and whether the consensus epoch ended (a block that
adopts a membership change is the last of its epoch; what the commit carried after it only proves
it), much as an ABCI application answers a finalized block. The daemon acts on the answer and never
reaches into the stores to find out.

Order and crashes: the public part of each block (membership, epoch keys) is applied first, then
the block store commits, then the rest of the state. After a crash between the two, :meth:`replay`
applies what the state missed. A member that lacks an epoch key the chain uses *stalls*: judging
an envelope it cannot open differently from the others would make its state diverge, so it stops
applying (it keeps storing blocks) and resumes once the key is sealed to it again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..consensus.types import Block, EpochEnd, QuorumCert
from ..errors import KeyUnavailable
from .block_store import SqliteBlockStore
from .state import Admitted, LedgerState
from .transactions import Transaction


@dataclass(frozen=True)
class Applied:
    """One committed block, and what the ledger made of it."""

    block: Block
    #: The block's valid transactions, in order (none if the ledger did not apply it).
    txs: Sequence[Transaction]
    #: False while the ledger is stalled: the block is stored, not applied.
    applied: bool

    @property
    def invalid(self) -> int:
        """Transactions the ledger recorded as invalid (0 if it did not apply the block)."""
        return len(self.block.payload) - len(self.txs) if self.applied else 0


@dataclass(frozen=True)
class Committed:
    blocks: Sequence[Applied]
    #: Set when the last of ``blocks`` ended the consensus epoch.
    ended: EpochEnd | None


class Chain:
    """The block store and the ledger state, kept in step."""

    def __init__(self, blocks: SqliteBlockStore, state: LedgerState, log: Any, *,
                 on_stall: Callable[[], None] = lambda: None) -> None:
        self.blocks, self.state = blocks, state
        self._log = log
        self._on_stall = on_stall
        #: The height at which this member found it lacks an epoch key: the state stops there.
        self.stalled_at: int | None = None
        self._keys_held = len(state.keys.epochs)

    def head(self) -> Block | None:
        return self.blocks.block_at(self.blocks.committed_height())

    def replay(self) -> None:
        """Apply the committed blocks the state has not seen (after a crash, or at a start)."""
        for height in range(self.state.public_height + 1, self.blocks.committed_height() + 1):
            block = self.blocks.block_at(height)
            assert block is not None
            self.state.apply_public(block)
        self._catch_up()

    def commit(self, blocks: Sequence[Block], proof: QuorumCert, epoch: int, admitted: Admitted) -> Committed:
        """Store and apply ``blocks``, committed by ``proof`` in consensus epoch ``epoch``."""
        ended = None
        for i, block in enumerate(blocks):
            self.state.apply_public(block, admitted)
            following = self.state.membership_at(block.height + 1)
            if following.epoch > epoch and following.starts == block.height + 1:
                blocks, ended = blocks[:i + 1], EpochEnd(block, tuple(blocks[i + 1:]), proof)
                break
        self.blocks.commit(tuple(blocks), proof, ended)
        applied = []
        for block in blocks:
            txs = self._apply(block, admitted)
            applied.append(Applied(block, txs or (), txs is not None))
        if self.stalled_at is not None and len(self.state.keys.epochs) > self._keys_held:
            self._catch_up()  # a key it lacked was sealed to it since
        self._keys_held = len(self.state.keys.epochs)
        return Committed(applied, ended)

    def _catch_up(self) -> None:
        """Apply the committed blocks the state has not; stops again at a block it still lacks a key for."""
        stalled, self.stalled_at = self.stalled_at, None
        for height in range(self.state.applied_height + 1, self.blocks.committed_height() + 1):
            block = self.blocks.block_at(height)
            assert block is not None
            if self._apply(block, None) is None:
                return
        if stalled is not None:
            self._log.warning("ledger.resumed", stalled_at=stalled, height=self.state.applied_height)

    def _apply(self, block: Block, admitted: Admitted | None) -> list[Transaction] | None:
        """Apply one committed block to the state; None once this member lacks an epoch key."""
        if self.stalled_at is not None:
            return None
        if block.height <= self.state.applied_height:
            return []  # after a power cut the state can be ahead of the block store
        try:
            return self.state.apply(block, admitted)
        except KeyUnavailable as exc:
            self.stalled_at = block.height
            self._log.error("ledger.stalled", height=block.height, error=str(exc),
                            detail="this member cannot read an epoch the chain uses; the ledger stops here "
                                   "until it holds that key, which it asks the other members to seal to it again "
                                   "(see docs/security.md)")
            self._on_stall()
            return None
