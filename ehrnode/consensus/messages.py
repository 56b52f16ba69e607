"""Consensus messages between validators and their one wire format.

A message is ``{"type": NAME, "body": ...}`` in canonical CBOR. Decoding is
strict (:func:`ehrnode.codec.decode`) and then schema-checked into the typed
classes below; signatures are checked later, by the core, against the
validator set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import codec
from ..codec import as_bytes, as_list, as_map, as_uint
from .types import Block, QuorumCert, Timeout, TimeoutCert, Vote

#: A sync response carries at most this many blocks.
MAX_SYNC_BLOCKS = 64
#: Upper bound of one consensus message on the wire (a full sync response).
MAX_WIRE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Proposal:
    """A leader's block for its round, with the timeout certificate it entered the round by, if any."""

    block: Block
    tc: TimeoutCert | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"block": self.block.to_wire(), "tc": None if self.tc is None else self.tc.to_wire()}

    @classmethod
    def from_wire(cls, value: Any) -> Proposal:
        m = as_map(value, "proposal", ("block", "tc"))
        tc = None if m["tc"] is None else TimeoutCert.from_wire(m["tc"], "proposal.tc")
        return cls(Block.from_wire(m["block"], "proposal.block"), tc)


@dataclass(frozen=True)
class VoteMsg:
    vote: Vote

    def to_wire(self) -> dict[str, Any]:
        return self.vote.to_wire()

    @classmethod
    def from_wire(cls, value: Any) -> VoteMsg:
        return cls(Vote.from_wire(value))


@dataclass(frozen=True)
class TimeoutMsg:
    """A timeout, plus the sender's highest timeout certificate so a lagging receiver can catch up."""

    timeout: Timeout
    high_tc: TimeoutCert | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"timeout": self.timeout.to_wire(), "tc": None if self.high_tc is None else self.high_tc.to_wire()}

    @classmethod
    def from_wire(cls, value: Any) -> TimeoutMsg:
        m = as_map(value, "timeout message", ("timeout", "tc"))
        tc = None if m["tc"] is None else TimeoutCert.from_wire(m["tc"], "timeout message.tc")
        return cls(Timeout.from_wire(m["timeout"]), tc)


@dataclass(frozen=True)
class SyncRequest:
    """"Send me ``block_id`` and up to ``count - 1`` of its ancestors, newest first"."""

    block_id: bytes
    count: int

    def to_wire(self) -> dict[str, Any]:
        return {"block": self.block_id, "count": self.count}

    @classmethod
    def from_wire(cls, value: Any) -> SyncRequest:
        m = as_map(value, "sync request", ("block", "count"))
        return cls(as_bytes(m["block"], "sync request.block", size=32),
                   as_uint(m["count"], "sync request.count", maximum=MAX_SYNC_BLOCKS))


@dataclass(frozen=True)
class SyncResponse:
    """Blocks answering a :class:`SyncRequest`: the requested one first, then each one's parent."""

    blocks: tuple[Block, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"blocks": [b.to_wire() for b in self.blocks]}

    @classmethod
    def from_wire(cls, value: Any) -> SyncResponse:
        m = as_map(value, "sync response", ("blocks",))
        items = as_list(m["blocks"], "sync response.blocks", max_len=MAX_SYNC_BLOCKS)
        return cls(tuple(Block.from_wire(b, f"sync response.blocks[{i}]") for i, b in enumerate(items)))


@dataclass(frozen=True)
class RangeRequest:
    """"Send me your committed blocks from ``from_height``, at most ``count`` of them"."""

    from_height: int
    count: int

    def to_wire(self) -> dict[str, Any]:
        return {"from": self.from_height, "count": self.count}

    @classmethod
    def from_wire(cls, value: Any) -> RangeRequest:
        m = as_map(value, "range request", ("from", "count"))
        return cls(as_uint(m["from"], "range request.from"),
                   as_uint(m["count"], "range request.count", maximum=MAX_SYNC_BLOCKS))


@dataclass(frozen=True)
class RangeResponse:
    """Committed blocks at consecutive heights, oldest first, and, when the range reaches the
    responder's newest committed block, the certificate that committed it."""

    blocks: tuple[Block, ...]
    proof: QuorumCert | None

    def to_wire(self) -> dict[str, Any]:
        return {"blocks": [b.to_wire() for b in self.blocks],
                "proof": None if self.proof is None else self.proof.to_wire()}

    @classmethod
    def from_wire(cls, value: Any) -> RangeResponse:
        m = as_map(value, "range response", ("blocks", "proof"))
        items = as_list(m["blocks"], "range response.blocks", max_len=MAX_SYNC_BLOCKS)
        proof = None if m["proof"] is None else QuorumCert.from_wire(m["proof"], "range response.proof")
        return cls(tuple(Block.from_wire(b, f"range response.blocks[{i}]") for i, b in enumerate(items)), proof)


@dataclass(frozen=True)
class EpochHint:
    """"I am in epoch ``epoch``": the answer to a message of an earlier epoch, so a validator
    still in it learns that it ended (and fetches the committed blocks that prove it) even
    when no validator of the new epoch is sending it anything."""

    epoch: int

    def to_wire(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    @classmethod
    def from_wire(cls, value: Any) -> EpochHint:
        m = as_map(value, "epoch hint", ("epoch",))
        return cls(as_uint(m["epoch"], "epoch hint.epoch"))


Message = Proposal | VoteMsg | TimeoutMsg | SyncRequest | SyncResponse | RangeRequest | RangeResponse | EpochHint

_BY_NAME: dict[str, Any] = {
    "proposal": Proposal, "vote": VoteMsg, "timeout": TimeoutMsg, "sync_request": SyncRequest,
    "sync_response": SyncResponse,
    "range_request": RangeRequest, "range_response": RangeResponse, "epoch_hint": EpochHint,
}
_NAMES = {cls: name for name, cls in _BY_NAME.items()}
_PARSERS = {name: cls.from_wire for name, cls in _BY_NAME.items()}


def message_type(message: Message) -> str:
    return _NAMES[type(message)]


def encode_message(message: Message) -> bytes:
    return codec.encode_tagged(_NAMES[type(message)], message.to_wire())


def decode_message(data: bytes, *, max_size: int = MAX_WIRE_BYTES) -> Message:
    """Strictly decode one consensus message (raises CodecError or SchemaError)."""
    return codec.decode_tagged(data, "message", _PARSERS, max_size=max_size)  # type: ignore[no-any-return]
