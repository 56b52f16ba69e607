import os
from dataclasses import replace

import pytest
import trio
import trio.testing
import trio_websocket
from hypothesis import given, settings
from hypothesis import strategies as st

from ehrnode import crypto
from ehrnode.errors import ProtocolError
from ehrnode.net.peers import CLOSE_POLICY, PeerNetwork
from ehrnode.net.protocol import (
    HANDSHAKE_DOMAIN,
    OLDEST_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Auth,
    BatchFrame,
    ConsensusFrame,
    Hello,
    TxFrame,
    Welcome,
    check_transcript,
    decode_frame,
    encode_frame,
    sign_transcript,
    transcript,
    unbatch,
)


def sample_frames(genesis):
    hello = Hello.fresh(genesis, "A")
    inner = (encode_frame(ConsensusFrame(b"\x01\x02")), encode_frame(TxFrame((os.urandom(40),))))
    return [hello, Welcome(hello, os.urandom(64)), Auth(os.urandom(64)), ConsensusFrame(b"\x01\x02"),
            TxFrame((os.urandom(100), os.urandom(50))), BatchFrame(inner)]


def test_a_batch_carries_its_frames_in_order_and_nothing_that_may_not_be_batched(consortium):
    genesis, _ = consortium
    frames = [ConsensusFrame(b"vote"), TxFrame((b"tx",)), ConsensusFrame(b"proposal")]
    batch = decode_frame(encode_frame(BatchFrame(tuple(encode_frame(f) for f in frames))))
    assert unbatch(batch) == frames
    assert unbatch(frames[0]) == [frames[0]]
    for forbidden in (Hello.fresh(genesis, "A"), Auth(os.urandom(64)), batch):
        with pytest.raises(ProtocolError) as refused:
            unbatch(BatchFrame((encode_frame(frames[0]), encode_frame(forbidden))))
        assert refused.value.reason == "bad_batch"
    with pytest.raises(ProtocolError) as bad:  # an inner frame that does not decode
        unbatch(BatchFrame((encode_frame(frames[0]), b"\xff\x00")))
    assert bad.value.reason.startswith("bad_frame")


def test_frames_round_trip(consortium):
    genesis, _ = consortium
    for frame in sample_frames(genesis):
        assert decode_frame(encode_frame(frame)) == frame


@given(st.binary(max_size=400))
@settings(max_examples=400)
def test_random_bytes_fail_only_with_protocol_errors(data):
    try:
        decode_frame(data)
    except ProtocolError:
        pass


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_mutated_frames_fail_only_with_protocol_errors(consortium, data):
    genesis, _ = consortium
    raw = bytearray(encode_frame(data.draw(st.sampled_from(sample_frames(genesis)))))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        frame = decode_frame(bytes(raw))
    except ProtocolError:
        return
    if isinstance(frame, Hello):
        try:
            frame.check_against(genesis)
        except ProtocolError:
            pass


@given(
    st.sampled_from(["A", "B", "C", "R", "Mallory", ""]),
    st.booleans(), st.booleans(), st.integers(0, PROTOCOL_VERSION + 1),
)
@settings(max_examples=200)
def test_hello_checks_chain_genesis_version_and_membership(consortium, name, same_chain, same_genesis, version):
    genesis, _ = consortium
    hello = Hello(version, genesis.chain_id if same_chain else "other", genesis.hash if same_genesis else bytes(32),
                  name, os.urandom(32))
    valid = (OLDEST_PROTOCOL_VERSION <= version <= PROTOCOL_VERSION and same_chain and same_genesis
             and name in {"A", "B", "C", "R"})
    if valid:
        hello.check_against(genesis)
    else:
        with pytest.raises(ProtocolError):
            hello.check_against(genesis)
    if version == PROTOCOL_VERSION and valid:  # a node that speaks only the oldest version refuses it
        with pytest.raises(ProtocolError) as old:
            hello.check_against(genesis, versions=(OLDEST_PROTOCOL_VERSION, OLDEST_PROTOCOL_VERSION))
        assert old.value.reason == "version"


def test_transcript_signature_binds_both_nonces_names_and_roles(consortium):
    genesis, keys = consortium
    dialer, listener = Hello.fresh(genesis, "A"), Hello.fresh(genesis, "B")
    sig = sign_transcript(keys["A"], genesis, dialer, listener, "dialer")
    check_transcript(genesis, dialer, listener, "dialer", sig)
    # Under TLS the certificates each side saw are bound in: a relay's would differ.
    bound = sign_transcript(keys["A"], genesis, dialer, listener, "dialer", b"c" * 64)
    check_transcript(genesis, dialer, listener, "dialer", bound, b"c" * 64)
    for channel in (b"", b"d" * 64):
        with pytest.raises(ProtocolError):
            check_transcript(genesis, dialer, listener, "dialer", bound, channel)
    with pytest.raises(ProtocolError):
        check_transcript(genesis, dialer, listener, "dialer", sig, b"c" * 64)
    for tampered in (
        (replace(dialer, nonce=os.urandom(32)), listener, "dialer"),
        (dialer, replace(listener, nonce=os.urandom(32)), "dialer"),
        (dialer, replace(listener, name="C"), "dialer"),
        (dialer, listener, "listener"),  # a dialer's signature is not a listener's
    ):
        with pytest.raises(ProtocolError):
            check_transcript(genesis, *tampered[:2], tampered[2], sig)
    with pytest.raises(ProtocolError):  # signed by a key that is not A's
        check_transcript(genesis, dialer, listener, "dialer",
                         sign_transcript(keys["B"], genesis, dialer, listener, "dialer"))


def test_the_transcript_binds_versions_from_version_3_and_is_unchanged_for_version_2(consortium):
    genesis, keys = consortium
    dialer, listener = Hello.fresh(genesis, "A"), Hello.fresh(genesis, "B")
    sig = sign_transcript(keys["A"], genesis, dialer, listener, "dialer")
    old = OLDEST_PROTOCOL_VERSION
    for rewritten in ((replace(dialer, version=old), listener), (dialer, replace(listener, version=old)),
                      (replace(dialer, version=old), replace(listener, version=old))):
        with pytest.raises(ProtocolError):  # someone between them rewrote a version
            check_transcript(genesis, *rewritten, "dialer", sig)
    d2, l2 = replace(dialer, version=old), replace(listener, version=old)
    assert transcript(genesis, d2, l2, "dialer") == crypto.signing_bytes(
        HANDSHAKE_DOMAIN, ["dialer", genesis.hash, "A", "B", dialer.nonce, listener.nonce])  # what version 2 signs


async def _handshake_pair(consortium, dialer_name, dialer_key, listener_name="B", *, dialer_versions=None,
                          listener_versions=None, version=None):
    """Run a real handshake over an in-memory stream; returns (dialer error, listener result)."""
    genesis, keys = consortium
    listener = PeerNetwork(genesis, listener_name, keys[listener_name], lambda *_: None,
                           **({"versions": listener_versions} if listener_versions else {}))
    dialer = PeerNetwork(genesis, dialer_name, dialer_key, lambda *_: None,
                         **({"versions": dialer_versions} if dialer_versions else {}))
    client_stream, server_stream = trio.testing.memory_stream_pair()
    results = {}
    async with trio.open_nursery() as nursery:
        async def server():
            request = await trio_websocket.wrap_server_stream(nursery, server_stream)
            ws = await request.accept()
            try:
                results["listener"] = await listener._listener_handshake(ws)
            except ProtocolError as exc:
                results["listener"] = exc
                await ws.aclose(CLOSE_POLICY, exc.reason)  # as a node does: the dialer learns why

        async def client():
            ws = await trio_websocket.wrap_client_stream(nursery, client_stream, "localhost", "/peer")
            try:
                results["dialer"] = await dialer._dialer_handshake(ws, listener_name, version=version)
            except ProtocolError as exc:
                results["dialer"] = exc

        nursery.start_soon(server)
        nursery.start_soon(client)
        with trio.fail_after(5):
            while len(results) < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    return results


async def test_members_complete_the_handshake_over_memory_streams(consortium):
    _, keys = consortium
    results = await _handshake_pair(consortium, "A", keys["A"])
    assert results == {"dialer": PROTOCOL_VERSION, "listener": ("A", PROTOCOL_VERSION)}


async def test_members_of_the_two_versions_agree_on_the_oldest(consortium):
    _, keys = consortium
    old = (OLDEST_PROTOCOL_VERSION, OLDEST_PROTOCOL_VERSION)
    # A node not upgraded yet dials an upgraded one: answered in its own version.
    results = await _handshake_pair(consortium, "A", keys["A"], dialer_versions=old)
    assert results == {"dialer": OLDEST_PROTOCOL_VERSION, "listener": ("A", OLDEST_PROTOCOL_VERSION)}
    # An upgraded node dials one not upgraded yet: refused for its version, which the dialer
    # sees (and dials again in the oldest, which is accepted).
    refused = await _handshake_pair(consortium, "A", keys["A"], listener_versions=old)
    assert isinstance(refused["listener"], ProtocolError) and refused["listener"].reason == "version"
    assert isinstance(refused["dialer"], ProtocolError) and refused["dialer"].reason == "refused:version"
    again = await _handshake_pair(consortium, "A", keys["A"], listener_versions=old, version=OLDEST_PROTOCOL_VERSION)
    assert again == {"dialer": OLDEST_PROTOCOL_VERSION, "listener": ("A", OLDEST_PROTOCOL_VERSION)}


async def test_a_dialer_answered_in_another_version_than_it_spoke_refuses(consortium):
    genesis, keys = consortium
    dialer = PeerNetwork(genesis, "A", keys["A"], lambda *_: None)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        async def listener():  # signs a welcome in version 2 to a hello in 3
            ws = await (await trio_websocket.wrap_server_stream(nursery, server_stream)).accept()
            hello = decode_frame(await ws.get_message())
            mine = Hello.fresh(genesis, "B", OLDEST_PROTOCOL_VERSION)
            await ws.send_message(encode_frame(Welcome(mine, sign_transcript(keys["B"], genesis, hello, mine,
                                                                             "listener"))))
            await trio.sleep_forever()

        nursery.start_soon(listener)
        ws = await trio_websocket.wrap_client_stream(nursery, client_stream, "localhost", "/peer")
        with pytest.raises(ProtocolError) as refused, trio.fail_after(5):
            await dialer._dialer_handshake(ws, "B")
        assert refused.value.reason == "version_mismatch"
        nursery.cancel_scope.cancel()


async def test_a_dialer_without_its_genesis_key_is_refused(consortium):
    results = await _handshake_pair(consortium, "A", crypto.Identity.generate())
    assert isinstance(results["listener"], ProtocolError) and results["listener"].reason == "bad_signature"
