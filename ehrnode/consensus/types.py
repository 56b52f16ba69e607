"""The consensus vocabulary: validators, blocks, votes, certificates, timeouts.

Every type has a wire form (a CBOR map, see :mod:`ehrnode.codec`), a
``from_wire`` that checks the shape of untrusted input, and a ``verify`` that
checks what the shape cannot: signatures by genesis validators, 2f+1 *distinct*
signers, rounds and parent links. ``verify`` raises
:class:`~ehrnode.errors.InvalidMessage` whose ``reason`` names the broken rule.

Signers are named by their index in the genesis validator list; certificates
list them in strictly increasing order, which makes "the same signer twice"
impossible to express without being caught.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from .. import codec, crypto
from ..codec import as_bytes, as_list, as_map, as_uint
from ..errors import InvalidMessage, SchemaError

ZERO_ID = bytes(32)
MAX_VALIDATORS = 256
MAX_TXS_PER_BLOCK = 10_000
MAX_TX_BYTES = 64 * 1024
#: A block's transactions, in bytes: small enough that a block always fits in one peer frame.
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024

VOTE_DOMAIN = "ehrnode/vote/v1"
TIMEOUT_DOMAIN = "ehrnode/timeout/v1"
PROPOSAL_DOMAIN = "ehrnode/proposal/v1"
GENESIS_DOMAIN = "ehrnode/genesis/v1"


@dataclass(frozen=True)
class ValidatorSet:
    """The validators of one epoch: n = 3f+1 (or more), quorum 2f+1.

    ``keys`` are Ed25519 public keys in genesis order; a validator's index in
    this tuple is how messages name it. Epoch 0 starts from genesis; each later
    epoch starts from ``start``, the last block of the epoch before it, which
    every honest validator committed (see ``docs/consensus.md``, "Epochs").
    """

    chain_id: str
    keys: tuple[bytes, ...]
    epoch: int = 0
    start: Block | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.keys) <= MAX_VALIDATORS:
            raise ValueError(f"a validator set has 1..{MAX_VALIDATORS} members")
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("a validator key is listed twice")

    @property
    def n(self) -> int:
        return len(self.keys)

    @property
    def f(self) -> int:
        """How many Byzantine validators the set tolerates."""
        return (self.n - 1) // 3

    @property
    def quorum(self) -> int:
        """Signatures a certificate needs: any two quorums share an honest validator."""
        return self.n - self.f

    def leader(self, round_: int) -> int:
        """Round-robin leader of ``round_`` (rounds entered by a timeout certificate, and while an
        epoch's history is shorter than the reputation window: see ``ConsensusCore.leader_after``)."""
        return round_ % self.n

    def key(self, index: int) -> bytes:
        if not 0 <= index < self.n:
            raise InvalidMessage(f"validator index {index} is not in the genesis set", reason="unknown_signer")
        return self.keys[index]

    @cached_property
    def genesis_id(self) -> bytes:
        return crypto.sha256(codec.encode([GENESIS_DOMAIN, self.chain_id, self.epoch, list(self.keys)]))

    @cached_property
    def genesis_block(self) -> Block:
        return Block(
            epoch=self.epoch, round=0, height=0, parent=ZERO_ID, qc=None, author=0, timestamp=0, payload=(),
            signature=b"", id_override=self.genesis_id,
        )

    @cached_property
    def genesis_qc(self) -> QuorumCert:
        """The certificate every chain starts from: it certifies genesis and carries no signatures."""
        data = VoteData(self.epoch, self.genesis_id, 0, 0, ZERO_ID, 0)
        return QuorumCert(data, ())

    @property
    def root(self) -> Block:
        """The block this epoch's chain extends: genesis, or the previous epoch's last block."""
        return self.start if self.start is not None else self.genesis_block

    @cached_property
    def root_qc(self) -> QuorumCert:
        """The certificate this epoch starts from, round 0 and unsigned like genesis's: it needs no
        signatures because every validator derives it from a block it already committed."""
        if self.start is None:
            return self.genesis_qc
        return QuorumCert(VoteData(self.epoch, self.start.id, 0, self.start.height, self.start.parent, 0), ())

    def successor(self, start: Block, keys: tuple[bytes, ...] | None = None) -> ValidatorSet:
        """The next epoch's validators (``keys``, default the same), starting from ``start``."""
        return ValidatorSet(self.chain_id, self.keys if keys is None else keys, self.epoch + 1, start)


def check_signers(vset: ValidatorSet, signers: Sequence[int], what: str) -> None:
    """Indices strictly increasing, each a genesis validator, at least a quorum of them."""
    previous = -1
    for index in signers:
        if index == previous:
            raise InvalidMessage(f"{what}: validator {index} signed twice", reason="duplicate_signer")
        if index < previous:
            raise InvalidMessage(f"{what}: signers not in increasing order", reason="unordered_signers")
        vset.key(index)
        previous = index
    if len(signers) < vset.quorum:
        raise InvalidMessage(
            f"{what}: {len(signers)} distinct signers, a quorum is {vset.quorum}", reason="no_quorum"
        )


# --- votes and quorum certificates ----------------------------------------------------


@dataclass(frozen=True)
class VoteData:
    """What a vote is for: a block, its round and height, and its parent.

    Carrying the parent makes a certificate self-describing: a QC whose round
    is its parent's round + 1 commits that parent (the 2-chain rule).
    """

    epoch: int
    block_id: bytes
    round: int
    height: int
    parent_id: bytes
    parent_round: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "block": self.block_id, "round": self.round, "height": self.height,
            "parent": self.parent_id, "parent_round": self.parent_round,
        }

    @classmethod
    def from_wire(cls, value: Any, what: str = "vote data") -> VoteData:
        m = as_map(value, what, ("epoch", "block", "round", "height", "parent", "parent_round"))
        return cls(
            as_uint(m["epoch"], f"{what}.epoch"),
            as_bytes(m["block"], f"{what}.block", size=32),
            as_uint(m["round"], f"{what}.round"),
            as_uint(m["height"], f"{what}.height"),
            as_bytes(m["parent"], f"{what}.parent", size=32),
            as_uint(m["parent_round"], f"{what}.parent_round"),
        )

    @cached_property
    def digest(self) -> bytes:
        return crypto.sha256(codec.encode(self.to_wire()))

    def signing_bytes(self, chain_id: str) -> bytes:
        return crypto.signing_bytes(VOTE_DOMAIN, [chain_id, self.to_wire()])

    def check_shape(self, what: str) -> None:
        if self.round == 0:
            raise InvalidMessage(f"{what}: only genesis has round 0", reason="bad_round")
        if self.parent_round >= self.round:
            raise InvalidMessage(f"{what}: parent round {self.parent_round} not below {self.round}", reason="bad_round")
        if self.height == 0:
            raise InvalidMessage(f"{what}: only genesis has height 0", reason="bad_height")


@dataclass(frozen=True)
class Vote:
    data: VoteData
    author: int
    signature: bytes

    @property
    def round(self) -> int:
        return self.data.round

    @property
    def block_id(self) -> bytes:
        return self.data.block_id

    @classmethod
    def create(cls, data: VoteData, author: int, identity: crypto.Identity, chain_id: str) -> Vote:
        return cls(data, author, identity.sign(data.signing_bytes(chain_id)))

    def to_wire(self) -> dict[str, Any]:
        return {"data": self.data.to_wire(), "author": self.author, "sig": self.signature}

    @classmethod
    def from_wire(cls, value: Any, what: str = "vote") -> Vote:
        m = as_map(value, what, ("data", "author", "sig"))
        return cls(
            VoteData.from_wire(m["data"], f"{what}.data"),
            as_uint(m["author"], f"{what}.author", maximum=MAX_VALIDATORS),
            as_bytes(m["sig"], f"{what}.sig", size=crypto.SIGNATURE_SIZE),
        )

    def verify(self, vset: ValidatorSet) -> None:
        check_epoch(vset, self.data.epoch, "vote")
        self.data.check_shape("vote")
        if not crypto.verify(vset.key(self.author), self.data.signing_bytes(vset.chain_id), self.signature):
            raise InvalidMessage(f"vote: bad signature from validator {self.author}", reason="bad_signature")


@dataclass(frozen=True)
class QuorumCert:
    """2f+1 distinct validators' votes for one :class:`VoteData`."""

    data: VoteData
    signatures: tuple[tuple[int, bytes], ...]

    @property
    def round(self) -> int:
        return self.data.round

    @property
    def block_id(self) -> bytes:
        return self.data.block_id

    @property
    def height(self) -> int:
        return self.data.height

    @property
    def commits_parent(self) -> bool:
        """The 2-chain rule: a certified block whose parent is one round older commits that parent."""
        return self.data.round == self.data.parent_round + 1 and self.data.height > 1

    def to_wire(self) -> dict[str, Any]:
        return {"data": self.data.to_wire(), "sigs": [[i, s] for i, s in self.signatures]}

    @classmethod
    def from_wire(cls, value: Any, what: str = "qc") -> QuorumCert:
        m = as_map(value, what, ("data", "sigs"))
        sigs = []
        for k, item in enumerate(as_list(m["sigs"], f"{what}.sigs", max_len=MAX_VALIDATORS)):
            pair = as_list(item, f"{what}.sigs[{k}]", max_len=2)
            if len(pair) != 2:
                raise SchemaError(f"{what}.sigs[{k}]: expected [signer, signature]")
            sigs.append((
                as_uint(pair[0], f"{what}.sigs[{k}].signer", maximum=MAX_VALIDATORS),
                as_bytes(pair[1], f"{what}.sigs[{k}].sig", size=crypto.SIGNATURE_SIZE),
            ))
        return cls(VoteData.from_wire(m["data"], f"{what}.data"), tuple(sigs))

    def verify(self, vset: ValidatorSet) -> None:
        check_epoch(vset, self.data.epoch, "qc")
        if self.data.round == 0:
            if self != vset.root_qc:
                raise InvalidMessage("qc: a round-0 certificate must be the epoch's root certificate",
                                     reason="bad_genesis_qc")
            return
        self.data.check_shape("qc")
        check_signers(vset, [i for i, _ in self.signatures], "qc")
        message = self.data.signing_bytes(vset.chain_id)
        for index, signature in self.signatures:
            if not crypto.verify(vset.keys[index], message, signature):
                raise InvalidMessage(f"qc: bad signature from validator {index}", reason="bad_signature")


# --- blocks --------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A proposed batch of transactions, chained to its parent by the parent's certificate.

    ``id`` is the SHA-256 of the canonical encoding of every field but the
    signature; the author signs the id.
    """

    epoch: int
    round: int
    height: int
    parent: bytes
    qc: QuorumCert | None
    author: int
    timestamp: int
    payload: tuple[bytes, ...]
    signature: bytes
    id_override: bytes | None = field(default=None, repr=False, compare=False)

    def body_wire(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "round": self.round, "height": self.height, "parent": self.parent,
            "qc": None if self.qc is None else self.qc.to_wire(), "author": self.author,
            "time": self.timestamp, "txs": list(self.payload),
        }

    @cached_property
    def id(self) -> bytes:
        if self.id_override is not None:
            return self.id_override
        return crypto.sha256(codec.encode(self.body_wire()))

    @property
    def is_genesis(self) -> bool:
        return self.round == 0

    @classmethod
    def propose(
        cls, *, epoch: int, round: int, qc: QuorumCert, author: int, timestamp: int,
        payload: Sequence[bytes], identity: crypto.Identity, chain_id: str,
    ) -> Block:
        return cls.unsigned(
            epoch=epoch, round=round, qc=qc, author=author, timestamp=timestamp, payload=payload,
        ).signed(identity, chain_id)

    @classmethod
    def unsigned(
        cls, *, epoch: int, round: int, qc: QuorumCert, author: int, timestamp: int, payload: Sequence[bytes],
    ) -> Block:
        """A block extending ``qc``, not yet signed (the safety rules sign proposals)."""
        return cls(epoch, round, qc.height + 1, qc.block_id, qc, author, timestamp, tuple(payload), b"")

    def signed(self, identity: crypto.Identity, chain_id: str) -> Block:
        signature = identity.sign(crypto.signing_bytes(PROPOSAL_DOMAIN, [chain_id, self.id]))
        return replace(self, signature=signature)

    def vote_data(self) -> VoteData:
        assert self.qc is not None
        return VoteData(self.epoch, self.id, self.round, self.height, self.parent, self.qc.round)

    def to_wire(self) -> dict[str, Any]:
        wire = self.body_wire()
        wire["sig"] = self.signature
        return wire

    @classmethod
    def from_wire(cls, value: Any, what: str = "block") -> Block:
        m = as_map(value, what, ("epoch", "round", "height", "parent", "qc", "author", "time", "txs", "sig"))
        txs = as_list(m["txs"], f"{what}.txs", max_len=MAX_TXS_PER_BLOCK)
        payload = tuple(as_bytes(tx, f"{what}.txs[{i}]", max_len=MAX_TX_BYTES) for i, tx in enumerate(txs))
        if m["qc"] is None:
            raise SchemaError(f"{what}.qc: only genesis lacks a certificate, and genesis is never sent")
        return cls(
            as_uint(m["epoch"], f"{what}.epoch"),
            as_uint(m["round"], f"{what}.round"),
            as_uint(m["height"], f"{what}.height"),
            as_bytes(m["parent"], f"{what}.parent", size=32),
            QuorumCert.from_wire(m["qc"], f"{what}.qc"),
            as_uint(m["author"], f"{what}.author", maximum=MAX_VALIDATORS),
            as_uint(m["time"], f"{what}.time"),
            payload,
            as_bytes(m["sig"], f"{what}.sig", size=crypto.SIGNATURE_SIZE),
        )

    def verify(self, vset: ValidatorSet) -> None:
        """Structure, links, author signature and the embedded certificate.

        Whether the author leads the block's round depends on the chain it extends: the
        consensus core checks that for proposals (``ConsensusCore.leader_of``)."""
        check_epoch(vset, self.epoch, "block")
        if self.qc is None or self.round == 0:
            raise InvalidMessage("block: only genesis has round 0 or no certificate", reason="bad_round")
        if self.parent != self.qc.block_id:
            raise InvalidMessage("block: parent is not the block its certificate certifies", reason="bad_parent")
        if self.round <= self.qc.round:
            raise InvalidMessage(
                f"block: round {self.round} not above its certificate's round {self.qc.round}", reason="bad_round"
            )
        if self.height != self.qc.height + 1:
            raise InvalidMessage("block: height is not its parent's height + 1", reason="bad_height")
        if sum(len(tx) for tx in self.payload) > MAX_PAYLOAD_BYTES:
            raise InvalidMessage("block: payload too large", reason="too_large")
        message = crypto.signing_bytes(PROPOSAL_DOMAIN, [vset.chain_id, self.id])
        if not crypto.verify(vset.key(self.author), message, self.signature):
            raise InvalidMessage("block: bad proposer signature", reason="bad_signature")
        self.qc.verify(vset)


# --- timeouts and timeout certificates -----------------------------------------------


def timeout_signing_bytes(chain_id: str, epoch: int, round_: int, high_qc_round: int) -> bytes:
    return crypto.signing_bytes(TIMEOUT_DOMAIN, [chain_id, epoch, round_, high_qc_round])


@dataclass(frozen=True)
class Timeout:
    """A validator's statement "round r made no progress here; my highest certificate is high_qc"."""

    epoch: int
    round: int
    high_qc: QuorumCert
    author: int
    signature: bytes

    @classmethod
    def create(
        cls, epoch: int, round_: int, high_qc: QuorumCert, author: int, identity: crypto.Identity, chain_id: str
    ) -> Timeout:
        sig = identity.sign(timeout_signing_bytes(chain_id, epoch, round_, high_qc.round))
        return cls(epoch, round_, high_qc, author, sig)

    def to_wire(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "round": self.round, "high_qc": self.high_qc.to_wire(),
            "author": self.author, "sig": self.signature,
        }

    @classmethod
    def from_wire(cls, value: Any, what: str = "timeout") -> Timeout:
        m = as_map(value, what, ("epoch", "round", "high_qc", "author", "sig"))
        return cls(
            as_uint(m["epoch"], f"{what}.epoch"),
            as_uint(m["round"], f"{what}.round"),
            QuorumCert.from_wire(m["high_qc"], f"{what}.high_qc"),
            as_uint(m["author"], f"{what}.author", maximum=MAX_VALIDATORS),
            as_bytes(m["sig"], f"{what}.sig", size=crypto.SIGNATURE_SIZE),
        )

    def verify(self, vset: ValidatorSet) -> None:
        check_epoch(vset, self.epoch, "timeout")
        if self.round == 0 or self.high_qc.round >= self.round:
            raise InvalidMessage("timeout: its certificate must be older than its round", reason="bad_round")
        message = timeout_signing_bytes(vset.chain_id, self.epoch, self.round, self.high_qc.round)
        if not crypto.verify(vset.key(self.author), message, self.signature):
            raise InvalidMessage(f"timeout: bad signature from validator {self.author}", reason="bad_signature")
        self.high_qc.verify(vset)


@dataclass(frozen=True)
class TimeoutCert:
    """2f+1 distinct timeouts for one round, with the highest certificate any signer reported.

    Each signer signed its own ``high_qc`` round, so the certificate keeps
    ``(signer, high_qc_round, signature)`` triples and the one QC with the
    largest of those rounds (the one the next leader must extend).
    """

    epoch: int
    round: int
    high_qc: QuorumCert
    signatures: tuple[tuple[int, int, bytes], ...]

    @property
    def highest_hqc_round(self) -> int:
        return self.high_qc.round

    def to_wire(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "round": self.round, "high_qc": self.high_qc.to_wire(),
            "sigs": [[i, r, s] for i, r, s in self.signatures],
        }

    @classmethod
    def from_wire(cls, value: Any, what: str = "tc") -> TimeoutCert:
        m = as_map(value, what, ("epoch", "round", "high_qc", "sigs"))
        sigs = []
        for k, item in enumerate(as_list(m["sigs"], f"{what}.sigs", max_len=MAX_VALIDATORS)):
            triple = as_list(item, f"{what}.sigs[{k}]", max_len=3)
            if len(triple) != 3:
                raise SchemaError(f"{what}.sigs[{k}]: expected [signer, high_qc_round, signature]")
            sigs.append((
                as_uint(triple[0], f"{what}.sigs[{k}].signer", maximum=MAX_VALIDATORS),
                as_uint(triple[1], f"{what}.sigs[{k}].high_qc_round"),
                as_bytes(triple[2], f"{what}.sigs[{k}].sig", size=crypto.SIGNATURE_SIZE),
            ))
        return cls(
            as_uint(m["epoch"], f"{what}.epoch"),
            as_uint(m["round"], f"{what}.round"),
            QuorumCert.from_wire(m["high_qc"], f"{what}.high_qc"),
            tuple(sigs),
        )

    def verify(self, vset: ValidatorSet) -> None:
        check_epoch(vset, self.epoch, "tc")
        if self.round == 0:
            raise InvalidMessage("tc: round 0 cannot time out", reason="bad_round")
        check_signers(vset, [i for i, _, _ in self.signatures], "tc")
        rounds = [r for _, r, _ in self.signatures]
        if max(rounds) != self.high_qc.round:
            raise InvalidMessage("tc: carried certificate is not the highest one signed", reason="bad_high_qc")
        if self.high_qc.round >= self.round:
            raise InvalidMessage("tc: a signer's certificate is not older than the round", reason="bad_round")
        for index, hqc_round, signature in self.signatures:
            message = timeout_signing_bytes(vset.chain_id, self.epoch, self.round, hqc_round)
            if not crypto.verify(vset.keys[index], message, signature):
                raise InvalidMessage(f"tc: bad signature from validator {index}", reason="bad_signature")
        self.high_qc.verify(vset)


def check_epoch(vset: ValidatorSet, epoch: int, what: str) -> None:
    if epoch != vset.epoch:
        raise InvalidMessage(f"{what}: epoch {epoch}, this validator set is epoch {vset.epoch}", reason="wrong_epoch")


def form_qc(votes: Sequence[Vote]) -> QuorumCert:
    """A certificate from already-verified votes on the same data (any order, distinct authors)."""
    ordered = sorted(votes, key=lambda v: v.author)
    return QuorumCert(ordered[0].data, tuple((v.author, v.signature) for v in ordered))


def form_tc(timeouts: Sequence[Timeout]) -> TimeoutCert:
    """A timeout certificate from already-verified timeouts for one round (distinct authors)."""
    ordered = sorted(timeouts, key=lambda t: t.author)
    high_qc = max((t.high_qc for t in ordered), key=lambda qc: qc.round)
    return TimeoutCert(
        ordered[0].epoch, ordered[0].round, high_qc, tuple((t.author, t.high_qc.round, t.signature) for t in ordered)
    )


@dataclass(frozen=True)
class EpochEnd:
    """How an epoch ended, kept to prove it to a validator still in it: its last block, the
    blocks after it that this validator's commit carried (never part of the chain), and the
    certificate that committed them."""

    last: Block
    tail: tuple[Block, ...]
    proof: QuorumCert


@dataclass(frozen=True)
class Recovery:
    """What a restarted validator reloads from its block store."""

    root: Block
    blocks: Sequence[Block] = ()
    high_qc: QuorumCert | None = None
