"""Signed consensus objects for tests: a 4-validator set whose keys the test holds."""

from __future__ import annotations

from ehrnode import crypto
from ehrnode.consensus.types import (
    Block,
    QuorumCert,
    Timeout,
    TimeoutCert,
    ValidatorSet,
    Vote,
    form_qc,
    form_tc,
)


class Factory:
    def __init__(self, n: int = 4, chain_id: str = "test-chain") -> None:
        self.identities = [crypto.Identity.from_seed(crypto.sha256(f"{chain_id}-{i}".encode())) for i in range(n)]
        self.vset = ValidatorSet(chain_id, tuple(i.public_key for i in self.identities))

    @property
    def genesis_qc(self) -> QuorumCert:
        return self.vset.genesis_qc

    def block(self, round_: int, qc: QuorumCert, payload: tuple[bytes, ...] = (), author: int | None = None) -> Block:
        author = self.vset.leader(round_) if author is None else author
        return Block.propose(
            epoch=0, round=round_, qc=qc, author=author, timestamp=round_ * 1000, payload=payload,
            identity=self.identities[author], chain_id=self.vset.chain_id,
        )

    def vote(self, block: Block, author: int) -> Vote:
        return Vote.create(block.vote_data(), author, self.identities[author], self.vset.chain_id)

    def qc(self, block: Block, signers: range | list[int] | None = None) -> QuorumCert:
        signers = range(self.vset.quorum) if signers is None else signers
        return form_qc([self.vote(block, i) for i in signers])

    def timeout(self, round_: int, high_qc: QuorumCert, author: int) -> Timeout:
        return Timeout.create(0, round_, high_qc, author, self.identities[author], self.vset.chain_id)

    def tc(self, round_: int, high_qcs: list[QuorumCert]) -> TimeoutCert:
        return form_tc([self.timeout(round_, qc, i) for i, qc in enumerate(high_qcs)])

    def chain(self, rounds: list[int]) -> list[Block]:
        """Blocks at ``rounds``, each extending the previous one's certificate."""
        blocks, qc = [], self.genesis_qc
        for r in rounds:
            block = self.block(r, qc)
            blocks.append(block)
            qc = self.qc(block)
        return blocks
