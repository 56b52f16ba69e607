"""Two members' peer networks on loopback: what queues up for a connection goes in one message
(to a peer that speaks version 3), in order, and a peer not upgraded yet gets a message per frame."""

import socket
from contextlib import asynccontextmanager
from functools import partial

import pytest
import structlog
import trio

from ehrnode.net.peers import PeerNetwork
from ehrnode.net.protocol import (
    BATCH_BYTES,
    OLDEST_PROTOCOL_VERSION,
    BatchFrame,
    ConsensusFrame,
    Hello,
    TxFrame,
    encode_frame,
)
from tests.waiting import until

OLD = (OLDEST_PROTOCOL_VERSION, OLDEST_PROTOCOL_VERSION)


@asynccontextmanager
async def linked(consortium, a_versions=None, b_versions=None):
    """A dialing B over loopback; yields (a, b, frames B received from A)."""
    genesis, keys = consortium
    received: list = []
    a = PeerNetwork(genesis, "A", keys["A"], lambda *_: None, **({"versions": a_versions} if a_versions else {}))
    b = PeerNetwork(genesis, "B", keys["B"], lambda _peer, frame: received.append(frame),
                    **({"versions": b_versions} if b_versions else {}))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(b.serve, "127.0.0.1", 0)
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(a._dial_forever, "B", "127.0.0.1", port)
        with trio.fail_after(10):
            while "B" not in a.peers or "A" not in b.peers:
                await trio.sleep(0.01)
        yield a, b, received
        await a.close_all()
        await b.close_all()
        nursery.cancel_scope.cancel()


async def test_frames_queued_together_go_in_one_message_each_in_order_consensus_first(consortium):
    async with linked(consortium) as (a, _b, received):
        peer = a.peers["B"]
        assert peer.batches
        votes = [ConsensusFrame(f"vote {i}".encode()) for i in range(300)]
        gossip = [TxFrame((f"tx {i}".encode(),)) for i in range(200)]
        large = TxFrame(tuple(bytes([i]) * 60_000 for i in range(5)))  # more than a batch holds: alone
        for i in range(200):  # queued without a checkpoint: the writer wakes to all of it
            a.send("B", encode_frame(gossip[i]), bulk=True)
            if i == 100:
                a.send("B", encode_frame(large), bulk=True)
        for vote in votes:
            a.send("B", encode_frame(vote))
        await until(lambda: len(received) == 501)
        assert received == [*votes, *gossip[:101], large, *gossip[101:]]
        assert not any(isinstance(frame, BatchFrame) for frame in received)  # unpacked before handling
        assert (peer.sent, peer.messages) == (501, 4)  # the votes; gossip before, the large frame, after
        assert len(encode_frame(large)) > BATCH_BYTES
        assert peer._bulk_bytes == 0  # what a batch took is no longer counted against the queue


async def test_a_peer_that_speaks_version_2_gets_a_message_per_frame(consortium):
    # The listener is not upgraded yet: the dialer is refused for its version and dials again in 2.
    async with linked(consortium, b_versions=OLD) as (a, b, received):
        assert not a.peers["B"].batches and not b.peers["A"].batches
        frames = [ConsensusFrame(f"vote {i}".encode()) for i in range(50)]
        for frame in frames:
            a.send("B", encode_frame(frame))
        await until(lambda: len(received) == 50)
        assert received == frames
        assert (a.peers["B"].sent, a.peers["B"].messages) == (50, 50)
    # The dialer is not upgraded yet: answered in its version, and sent no batch either.
    async with linked(consortium, a_versions=OLD) as (a, b, received):
        assert not a.peers["B"].batches and not b.peers["A"].batches
        for frame in frames:
            b.send("A", encode_frame(frame))
        await until(lambda: b.peers["A"].sent == 50)
        assert b.peers["A"].messages == 50


async def test_after_one_dial_in_the_oldest_version_a_member_dials_in_the_newest_again(consortium):
    """A peer that refused the newest version may be upgraded before the next dial succeeds: the
    dial in the oldest version is tried once, not kept until a connection is made."""
    genesis, keys = consortium
    a = PeerNetwork(genesis, "A", keys["A"], lambda *_: None)
    with socket.socket() as probe:  # a port nobody listens on yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with trio.open_nursery() as nursery:
        a._speak_oldest.add("B")  # as after B refused version 3
        with structlog.testing.capture_logs() as logs:
            nursery.start_soon(a._dial_forever, "B", "127.0.0.1", port)
            # That dial was tried, and found nobody.
            await until(lambda: any(e["event"] == "peer.dial_failed" for e in logs))
        assert "B" not in a._speak_oldest
        upgraded = PeerNetwork(genesis, "B", keys["B"], lambda *_: None)
        await nursery.start(partial(upgraded.serve, "127.0.0.1", port))
        await until(lambda: "B" in a.peers and "A" in upgraded.peers)  # each side registers on its own
        assert a.peers["B"].batches and upgraded.peers["A"].batches
        await a.close_all()
        await upgraded.close_all()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("versions, inner, reason", [
    (None, encode_frame(Hello(OLDEST_PROTOCOL_VERSION, "x", bytes(32), "A", bytes(32))), "bad_batch"),  # handshake
    (None, encode_frame(BatchFrame((encode_frame(ConsensusFrame(b"x")),))), "bad_batch"),  # a batch in a batch
    (None, b"\xff\x00", "bad_frame:"),  # a frame that does not decode
    (OLD, encode_frame(ConsensusFrame(b"fine")), "unexpected_batch"),  # any batch from a version-2 peer
])
async def test_a_bad_batch_closes_the_connection_and_nothing_in_it_is_handled(consortium, versions, inner, reason):
    async with linked(consortium, a_versions=versions, b_versions=versions) as (a, b, received):
        first = b.peers["A"]
        with structlog.testing.capture_logs() as logs:
            a.send("B", encode_frame(BatchFrame((encode_frame(ConsensusFrame(b"before")), inner))))
            await until(lambda: b.peers.get("A") is not first)  # closed (and A dials again)
        assert received == []
        bad = [e for e in logs if e["event"] == "peer.bad_frame"]
        assert len(bad) == 1 and bad[0]["reason"].startswith(reason)
