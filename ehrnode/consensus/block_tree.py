"""The tree of blocks above the last committed one.

The root is the last committed block. Every other block in the tree descends
from it; committing a block makes it the new root and drops every branch that
does not descend from it, so the tree never holds more than the uncommitted
tail of the chain and its forks.
"""

from __future__ import annotations

from .types import Block


class BlockTree:
    def __init__(self, root: Block) -> None:
        self.root = root
        self._blocks: dict[bytes, Block] = {root.id: root}
        self._children: dict[bytes, set[bytes]] = {root.id: set()}

    def __contains__(self, block_id: bytes) -> bool:
        return block_id in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def get(self, block_id: bytes) -> Block | None:
        return self._blocks.get(block_id)

    def insert(self, block: Block) -> bool:
        """Add ``block`` under its parent; False if it is known already or its parent is not in the tree."""
        if block.id in self._blocks or block.parent not in self._blocks:
            return False
        self._blocks[block.id] = block
        self._children[block.id] = set()
        self._children[block.parent].add(block.id)
        return True

    def branch(self, block_id: bytes) -> list[Block]:
        """The blocks from just above the root up to ``block_id``, oldest first ([] for the root)."""
        path: list[Block] = []
        current = self._blocks[block_id]
        while current.id != self.root.id:
            path.append(current)
            current = self._blocks[current.parent]
        path.reverse()
        return path

    def commit(self, block_id: bytes) -> list[Block]:
        """Make ``block_id`` the root; returns the newly committed blocks, oldest first."""
        committed = self.branch(block_id)
        if not committed:
            return []
        keep: dict[bytes, Block] = {}
        stack = [block_id]
        while stack:
            current = stack.pop()
            keep[current] = self._blocks[current]
            stack.extend(self._children[current])
        self._children = {bid: self._children[bid] for bid in keep}
        self._blocks = keep
        self.root = self._blocks[block_id]
        return committed
