"""Hostile or broken peers against a running consortium: each refused and logged, commits go on."""

import os

import trio
import trio_websocket

from ehrnode import codec, crypto
from ehrnode.consensus.messages import VoteMsg, encode_message
from ehrnode.consensus.types import Vote, VoteData
from ehrnode.net.protocol import (
    PROTOCOL_VERSION,
    Auth,
    ConsensusFrame,
    Hello,
    Welcome,
    decode_frame,
    encode_frame,
    sign_transcript,
)

#: The hostile peers here speak the wire protocol in clear; test_tls.py covers TLS.
PLAINTEXT = True


async def open_peer(cluster, name):
    address = cluster.configs[name].peer_listen
    return trio_websocket.open_websocket(address.host, address.port, "/peer", use_ssl=False,
                                         max_message_size=16 * 1024 * 1024)


async def handshake_as(cluster, ws, name, identity, hello=None):
    hello = hello or Hello.fresh(cluster.genesis, name)
    await ws.send_message(encode_frame(hello))
    welcome = decode_frame(await ws.get_message())
    assert isinstance(welcome, Welcome)
    auth = Auth(sign_transcript(identity, cluster.genesis, hello, welcome.hello, "dialer"))
    await ws.send_message(encode_frame(auth))
    return hello, auth


async def closed(ws, timeout=10.0):
    """Wait until the node closes the connection; returns the close code."""
    with trio.fail_after(timeout):
        try:
            while True:
                await ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            return exc.reason.code


async def wait_log(cluster, name, needle, timeout=10.0):
    with trio.fail_after(timeout):
        while needle not in cluster.log(name):
            await trio.sleep(0.1)


async def test_hostile_peers_are_refused_and_logged_while_commits_continue(cluster):
    cluster.start_all()
    await cluster.wait_ready()
    start = await cluster.height("A")
    b_identity = crypto.Identity.load(cluster.configs["B"].signing_key_path)

    # 1. A key not in genesis, claiming a member's name.
    async with await open_peer(cluster, "R") as ws:
        await handshake_as(cluster, ws, "B", crypto.Identity.generate())
        await closed(ws)
    await wait_log(cluster, "R", '"reason": "bad_signature"')

    # 1b. A member dialing the wrong way (B must wait for A to dial it).
    async with await open_peer(cluster, "A") as ws:
        await ws.send_message(encode_frame(Hello.fresh(cluster.genesis, "B")))
        await closed(ws)
    await wait_log(cluster, "A", '"reason": "wrong_direction"')

    # 2. A name not in genesis.
    async with await open_peer(cluster, "A") as ws:
        await ws.send_message(encode_frame(Hello.fresh(cluster.genesis, "Mallory")))
        await closed(ws)
    await wait_log(cluster, "A", '"reason": "unknown_member"')

    # 3. A replayed handshake: a real one recorded, then sent again on a new connection.
    async with await open_peer(cluster, "C") as ws:
        hello, auth = await handshake_as(cluster, ws, "B", b_identity)
    async with await open_peer(cluster, "C") as ws:
        await ws.send_message(encode_frame(hello))
        await ws.get_message()  # C's welcome, with a fresh nonce
        await ws.send_message(encode_frame(auth))
        await closed(ws)
    await wait_log(cluster, "C", '"reason": "bad_signature"')

    # 4. A wrong genesis hash.
    async with await open_peer(cluster, "A") as ws:
        wrong = Hello(PROTOCOL_VERSION, cluster.genesis.chain_id, bytes(32), "B", os.urandom(32))
        await ws.send_message(encode_frame(wrong))
        await closed(ws)
    await wait_log(cluster, "A", '"reason": "wrong_genesis"')

    # 5. A 10 MiB frame and 6. random bytes, before any handshake.
    async with await open_peer(cluster, "R") as ws:
        try:
            await ws.send_message(b"\0" * (10 * 1024 * 1024))
        except trio_websocket.ConnectionClosed as exc:
            assert exc.reason.code == 1009  # closed as "message too big" while we were still sending
        else:
            assert await closed(ws) == 1009
    await wait_log(cluster, "R", '"reason": "too_large"')
    async with await open_peer(cluster, "R") as ws:
        await ws.send_message(os.urandom(512))
        await closed(ws)
    await wait_log(cluster, "R", '"reason": "bad_frame:')

    # 7. An authenticated member sending a well-formed vote with a bad signature. C is stopped
    # so its real node does not reconnect and replace the impostor's connection; A, B and R
    # are still a quorum.
    assert cluster.stop("C") == 0
    c_identity = crypto.Identity.load(cluster.configs["C"].signing_key_path)
    async with await open_peer(cluster, "R") as ws:
        await handshake_as(cluster, ws, "C", c_identity)
        status = await cluster.status("R")
        # A few rounds ahead: R may have moved on by the time it reads the vote, and a vote two
        # rounds behind is dropped as stale, unread.
        ahead = status["round"] + 5
        vote = Vote(VoteData(0, os.urandom(32), ahead, 5, os.urandom(32), ahead - 1),
                    cluster.genesis.index("C"), os.urandom(64))
        await ws.send_message(encode_frame(ConsensusFrame(encode_message(VoteMsg(vote)))))
        assert await closed(ws) == 1008
    await wait_log(cluster, "R", '"event": "consensus.invalid_message"')

    # 8. An authenticated member sending a frame that is not canonical CBOR.
    async with await open_peer(cluster, "R") as ws:
        await handshake_as(cluster, ws, "C", c_identity)
        await ws.send_message(codec.encode({"type": "tx", "body": b"x"}) + b"\0")
        assert await closed(ws) == 1002
    await wait_log(cluster, "R", '"event": "peer.bad_frame"')

    # Through all of it, the consortium kept committing and every node stayed up.
    await cluster.call("A", "tx.submit", note="after-the-attacks", wait=True, timeout=60)
    await cluster.wait_height(["A", "B", "R"], start + 2)
    assert all(proc.poll() is None for proc in cluster.procs.values())
