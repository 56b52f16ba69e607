"""The peer wire protocol: frames and the authenticated handshake.

Every websocket message between peers is one frame, the canonical CBOR of
``{"type": NAME, "body": ...}``, at most :data:`MAX_FRAME_BYTES`, decoded
strictly. Frame types:

``hello``      the dialer's protocol version, chain id, genesis hash, name and a fresh nonce
``welcome``    the listener's own hello, plus its signature over the transcript
``auth``       the dialer's signature over the transcript
``consensus``  one consensus message (its own canonical bytes)
``txs``        a batch of signed transactions (each its own canonical bytes)
``pull``       a signed pull request (:mod:`ehrnode.sharing.messages`)
``answer``     a part of the owner's answer to a pull request
``round?``     a restored validator's question: your highest certificates? (a nonce)
``round``      the answer: the nonce and this validator's highest QC and TC
``oprf?``      blinded values to evaluate under the OPRF key share
``oprf``       their evaluations
``batch``      several of the frames above (never a handshake frame or another batch), each
               its own encoded bytes, in the order they were queued

Batches (protocol version 3): a connection's writer sends the frames queued for
it in one of its queues (consensus first, then gossip), up to :data:`BATCH_BYTES`,
as one message. Each websocket message costs both ends a fixed amount (framing,
a TLS record, a system call, a task switch on the reader's side) that is larger
than decoding a small frame, and under load dozens of frames wait for one
connection at a time. A batch is unpacked before any of its
frames is handled, and one bad frame inside breaks the connection as it would alone.

Versions: a node speaks :data:`PROTOCOL_VERSION` and still accepts
:data:`OLDEST_PROTOCOL_VERSION`, whose ledger rules are the same (version 3 adds only
batches), so members can upgrade one at a time. The dialer says which version it
speaks and the listener answers in that version, or refuses it; a dialer refused
for its version dials once in the oldest, then in its own again (the peer may
have been upgraded meanwhile). Nothing is batched to a peer that speaks version 2.

Handshake: the transcript is (genesis hash, dialer name, listener name,
dialer nonce, listener nonce), and from version 3 on both hellos' versions.
Each side signs it under its own role tag with the Ed25519 key genesis lists
for its name, so only genesis members get in, each side proves it holds its
key, and nothing recorded from an earlier handshake verifies again (the other
side's nonce is fresh).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import codec, crypto
from ..codec import as_bytes, as_list, as_map, as_str, as_uint
from ..config import Genesis
from ..errors import CodecError, ProtocolError

#: Peers of a version outside OLDEST_PROTOCOL_VERSION..PROTOCOL_VERSION are refused at the
#: handshake, logged with both. The oldest version accepted moves up whenever the ledger's rules
#: change: nodes applying the same blocks by different rules would hold different ledgers
#: without noticing. Version 2 adds ``record.anchors`` and ``access.logs``; version 3 adds
#: batches (the ledger's rules are version 2's).
PROTOCOL_VERSION = 3
OLDEST_PROTOCOL_VERSION = 2
#: The first version whose peers accept ``batch`` frames.
BATCH_VERSION = 3
#: What a writer puts in one batch at most: a larger frame goes alone, and a batch of gossip
#: never holds a consensus frame queued behind it for long (64 KiB is 5 ms at 100 Mbit/s).
#: Under load frames are mostly far smaller, so it still carries dozens.
BATCH_BYTES = 64 * 1024
#: Frames in one batch at most (a connection's queue holds no more than 1024 of each kind).
MAX_BATCH_FRAMES = 2048
MAX_FRAME_BYTES = 8 * 1024 * 1024
#: Handshake frames come from peers not yet authenticated: a small cap, checked before decoding.
MAX_HANDSHAKE_FRAME = 4096
NONCE_SIZE = 32
MAX_TX_BATCH = 1000
MAX_TX_BYTES = 64 * 1024
HANDSHAKE_DOMAIN = "ehrnode/handshake/v1"


@dataclass(frozen=True)
class Hello:
    version: int
    chain_id: str
    genesis_hash: bytes
    name: str
    nonce: bytes

    @classmethod
    def fresh(cls, genesis: Genesis, name: str, version: int = PROTOCOL_VERSION) -> Hello:
        return cls(version, genesis.chain_id, genesis.hash, name, os.urandom(NONCE_SIZE))

    def to_wire(self) -> dict[str, Any]:
        return {"version": self.version, "chain": self.chain_id, "genesis": self.genesis_hash, "name": self.name,
                "nonce": self.nonce}

    @classmethod
    def from_wire(cls, value: Any) -> Hello:
        m = as_map(value, "hello", ("version", "chain", "genesis", "name", "nonce"))
        return cls(
            as_uint(m["version"], "hello.version"),
            as_str(m["chain"], "hello.chain", max_len=64),
            as_bytes(m["genesis"], "hello.genesis", size=32),
            as_str(m["name"], "hello.name", max_len=32),
            as_bytes(m["nonce"], "hello.nonce", size=NONCE_SIZE),
        )

    def check_against(self, genesis: Genesis, members: Mapping[str, bytes] | None = None,
                      versions: tuple[int, int] = (OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION)) -> None:
        """A protocol version within ``versions`` (oldest, newest), same chain, same genesis, the
        name of a current member (``members``: their signing keys, default genesis's); else
        ProtocolError."""
        oldest, newest = versions
        if not oldest <= self.version <= newest:
            spoken = f"{newest}" if oldest == newest else f"{oldest} to {newest}"
            raise ProtocolError(f"protocol version {self.version}, this node speaks {spoken}", reason="version")
        if self.chain_id != genesis.chain_id:
            raise ProtocolError(f"peer is on chain {self.chain_id!r}, not {genesis.chain_id!r}", reason="wrong_chain")
        if self.genesis_hash != genesis.hash:
            raise ProtocolError("peer has a different genesis", reason="wrong_genesis")
        if self.name not in (members if members is not None else {m.name for m in genesis.members}):
            raise ProtocolError(f"{self.name!r} is not a consortium member", reason="unknown_member")


@dataclass(frozen=True)
class Welcome:
    hello: Hello
    signature: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"hello": self.hello.to_wire(), "sig": self.signature}

    @classmethod
    def from_wire(cls, value: Any) -> Welcome:
        m = as_map(value, "welcome", ("hello", "sig"))
        return cls(Hello.from_wire(m["hello"]), as_bytes(m["sig"], "welcome.sig", size=crypto.SIGNATURE_SIZE))


@dataclass(frozen=True)
class Auth:
    signature: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"sig": self.signature}

    @classmethod
    def from_wire(cls, value: Any) -> Auth:
        m = as_map(value, "auth", ("sig",))
        return cls(as_bytes(m["sig"], "auth.sig", size=crypto.SIGNATURE_SIZE))


@dataclass(frozen=True)
class ConsensusFrame:
    data: bytes

    def to_wire(self) -> bytes:
        return self.data

    @classmethod
    def from_wire(cls, value: Any) -> ConsensusFrame:
        return cls(as_bytes(value, "consensus", max_len=MAX_FRAME_BYTES))


@dataclass(frozen=True)
class TxFrame:
    """A batch of signed transactions (gossip is batched: one frame per few milliseconds)."""

    txs: tuple[bytes, ...]

    def to_wire(self) -> list[bytes]:
        return list(self.txs)

    @classmethod
    def from_wire(cls, value: Any) -> TxFrame:
        items = as_list(value, "txs", max_len=MAX_TX_BATCH)
        return cls(tuple(as_bytes(tx, f"txs[{i}]", max_len=MAX_TX_BYTES) for i, tx in enumerate(items)))


@dataclass(frozen=True)
class PullFrame:
    """A signed pull request, decoded by the sharing layer."""

    data: bytes

    def to_wire(self) -> bytes:
        return self.data

    @classmethod
    def from_wire(cls, value: Any) -> PullFrame:
        return cls(as_bytes(value, "pull", max_len=4096))


@dataclass(frozen=True)
class AnswerFrame:
    """One part of an answer to a pull request, decoded by the sharing layer."""

    data: bytes

    def to_wire(self) -> bytes:
        return self.data

    @classmethod
    def from_wire(cls, value: Any) -> AnswerFrame:
        return cls(as_bytes(value, "answer", max_len=MAX_FRAME_BYTES))


@dataclass(frozen=True)
class OprfRequestFrame:
    """Blinded values to evaluate under the OPRF key, decoded by the EMPI layer."""

    data: bytes

    def to_wire(self) -> bytes:
        return self.data

    @classmethod
    def from_wire(cls, value: Any) -> OprfRequestFrame:
        return cls(as_bytes(value, "oprf?", max_len=OPRF_FRAME_BYTES))


@dataclass(frozen=True)
class OprfAnswerFrame:
    """An answer to an OPRF request, decoded by the EMPI layer."""

    data: bytes

    def to_wire(self) -> bytes:
        return self.data

    @classmethod
    def from_wire(cls, value: Any) -> OprfAnswerFrame:
        return cls(as_bytes(value, "oprf", max_len=OPRF_FRAME_BYTES))


#: An OPRF request or answer: 4096 points and their framing.
OPRF_FRAME_BYTES = 160 * 1024


@dataclass(frozen=True)
class RoundQueryFrame:
    nonce: bytes

    def to_wire(self) -> bytes:
        return self.nonce

    @classmethod
    def from_wire(cls, value: Any) -> RoundQueryFrame:
        return cls(as_bytes(value, "round?", size=16))


@dataclass(frozen=True)
class RoundAnswerFrame:
    data: bytes

    def to_wire(self) -> bytes:
        return self.data

    @classmethod
    def from_wire(cls, value: Any) -> RoundAnswerFrame:
        return cls(as_bytes(value, "round", max_len=256 * 1024))


@dataclass(frozen=True)
class BatchFrame:
    """Frames queued for one connection, sent as one message: each is its own encoded bytes."""

    frames: tuple[bytes, ...]

    def to_wire(self) -> list[bytes]:
        return list(self.frames)

    @classmethod
    def from_wire(cls, value: Any) -> BatchFrame:
        items = as_list(value, "batch", max_len=MAX_BATCH_FRAMES)
        return cls(tuple(as_bytes(frame, f"batch[{i}]", max_len=MAX_FRAME_BYTES) for i, frame in enumerate(items)))


Frame = (BatchFrame | Hello | Welcome | Auth | ConsensusFrame | TxFrame | PullFrame | AnswerFrame | RoundQueryFrame
         | RoundAnswerFrame | OprfRequestFrame | OprfAnswerFrame)
_BY_NAME: dict[str, Any] = {
    "hello": Hello, "welcome": Welcome, "auth": Auth, "consensus": ConsensusFrame, "txs": TxFrame,
    "pull": PullFrame, "answer": AnswerFrame, "round?": RoundQueryFrame, "round": RoundAnswerFrame,
    "oprf?": OprfRequestFrame, "oprf": OprfAnswerFrame, "batch": BatchFrame,
}
_NAMES = {cls: name for name, cls in _BY_NAME.items()}
_PARSERS = {name: cls.from_wire for name, cls in _BY_NAME.items()}


def encode_frame(frame: Frame) -> bytes:
    return codec.encode_tagged(_NAMES[type(frame)], frame.to_wire())


def decode_frame(data: bytes | str, *, max_size: int = MAX_FRAME_BYTES) -> Frame:
    """Strictly decode one frame (raises ProtocolError naming what was wrong)."""
    if isinstance(data, str):
        raise ProtocolError("text frame on a binary protocol", reason="text_frame")
    if len(data) > max_size:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds {max_size}", reason="too_large")
    try:
        return codec.decode_tagged(data, "frame", _PARSERS, max_size=max_size)
    except CodecError as exc:
        raise ProtocolError(f"bad frame: {exc}", reason=f"bad_frame:{exc.reason}") from exc


def unbatch(frame: Frame) -> list[Frame]:
    """The frames ``frame`` carries (itself, unless a batch), each decoded strictly. A batch may
    not hold a handshake frame or another batch (ProtocolError); an empty batch carries nothing."""
    if not isinstance(frame, BatchFrame):
        return [frame]
    frames = [decode_frame(data) for data in frame.frames]
    for inner in frames:
        if isinstance(inner, (BatchFrame, Hello, Welcome, Auth)):
            raise ProtocolError(f"a batch holds a {_NAMES[type(inner)]} frame", reason="bad_batch")
    return frames


def transcript(genesis: Genesis, dialer: Hello, listener: Hello, role: str, channel: bytes = b"") -> bytes:
    """What each side signs. ``channel``, under TLS, is the SHA-256 of the dialer's certificate and of
    the listener's as each side saw them: someone relaying between two members with certificates of
    their own (it would need the CA's key) makes the two sides sign different transcripts."""
    fields: list[object] = [role, genesis.hash, dialer.name, listener.name, dialer.nonce, listener.nonce]
    if channel:
        fields.append(channel)
    if max(dialer.version, listener.version) >= BATCH_VERSION:
        # Bound in from version 3 on (version 2's transcript is unchanged): nobody between two
        # members can make one believe the other speaks another version than it does.
        fields.append([dialer.version, listener.version])
    return crypto.signing_bytes(HANDSHAKE_DOMAIN, fields)


def sign_transcript(identity: crypto.Identity, genesis: Genesis, dialer: Hello, listener: Hello, role: str,
                    channel: bytes = b"") -> bytes:
    return identity.sign(transcript(genesis, dialer, listener, role, channel), remember=False)


def check_transcript(genesis: Genesis, dialer: Hello, listener: Hello, role: str, signature: bytes,
                     channel: bytes = b"", members: Mapping[str, bytes] | None = None) -> None:
    signer = dialer.name if role == "dialer" else listener.name
    key = members[signer] if members is not None else genesis.member(signer).signing_key
    if not crypto.verify(key, transcript(genesis, dialer, listener, role, channel), signature):
        raise ProtocolError(f"{signer!r} did not prove it holds its signing key", reason="bad_signature")
