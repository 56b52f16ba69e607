from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ehrnode import codec
from ehrnode.consensus.messages import (
    Proposal,
    SyncRequest,
    SyncResponse,
    TimeoutMsg,
    VoteMsg,
    decode_message,
    encode_message,
)
from ehrnode.consensus.types import QuorumCert, TimeoutCert
from ehrnode.errors import CodecError, InvalidMessage

from .factory import Factory

F = Factory()


def reason_of(fn):
    with pytest.raises(InvalidMessage) as err:
        fn()
    return err.value.reason


def test_valid_chain_verifies():
    b1, b2 = F.chain([1, 2])
    b1.verify(F.vset)
    b2.verify(F.vset)
    F.qc(b2).verify(F.vset)
    assert b2.parent == b1.id and b2.height == 2


def test_certificate_needs_a_quorum_of_distinct_genesis_validators():
    (b1,) = F.chain([1])
    qc = F.qc(b1)
    sigs = qc.signatures
    assert reason_of(lambda: QuorumCert(qc.data, sigs[:2]).verify(F.vset)) == "no_quorum"
    assert reason_of(lambda: QuorumCert(qc.data, (sigs[0], sigs[0], sigs[1])).verify(F.vset)) == "duplicate_signer"
    assert reason_of(lambda: QuorumCert(qc.data, (sigs[1], sigs[0], sigs[2])).verify(F.vset)) == "unordered_signers"
    assert reason_of(lambda: QuorumCert(qc.data, sigs[:2] + ((9, sigs[2][1]),)).verify(F.vset)) == "unknown_signer"
    forged = sigs[:2] + ((sigs[2][0], bytes(64)),)
    assert reason_of(lambda: QuorumCert(qc.data, forged).verify(F.vset)) == "bad_signature"
    # A signature over other data does not count for this data.
    other = replace(qc.data, round=qc.data.round + 5)
    assert reason_of(lambda: QuorumCert(other, sigs).verify(F.vset)) == "bad_signature"


def test_certificate_from_another_chain_does_not_verify():
    other = Factory(chain_id="other-chain")
    (b1,) = other.chain([1])
    qc = other.qc(b1)
    assert reason_of(lambda: qc.verify(F.vset)) == "bad_signature"


def test_genesis_certificate_is_the_only_round_zero_one():
    F.genesis_qc.verify(F.vset)
    fake = replace(F.genesis_qc, data=replace(F.genesis_qc.data, block_id=b"\x01" * 32))
    assert reason_of(lambda: fake.verify(F.vset)) == "bad_genesis_qc"


def test_block_must_link_to_its_certificate_and_be_signed_by_its_author():
    (b1,) = F.chain([1])
    qc1 = F.qc(b1)
    assert reason_of(lambda: replace(F.block(2, qc1), author=7).verify(F.vset)) == "unknown_signer"
    good = F.block(2, qc1)
    assert reason_of(lambda: replace(good, parent=bytes(32)).verify(F.vset)) == "bad_parent"
    bad_sig = replace(good, signature=bytes(64))
    assert reason_of(lambda: bad_sig.verify(F.vset)) == "bad_signature"
    stale_round = F.block(1, qc1, author=F.vset.leader(1))
    assert reason_of(lambda: stale_round.verify(F.vset)) == "bad_round"


def test_block_height_must_follow_its_parent():
    (b1,) = F.chain([1])
    block = F.block(2, F.qc(b1))
    tampered = replace(block, height=5)
    # The id covers the height, so the signature no longer matches either; height is checked first.
    assert reason_of(lambda: tampered.verify(F.vset)) == "bad_height"


def test_timeout_certificate_carries_the_highest_reported_certificate():
    b1, b2 = F.chain([1, 2])
    q1, q2 = F.qc(b1), F.qc(b2)
    tc = F.tc(3, [q1, q2, q1])
    tc.verify(F.vset)
    assert tc.highest_hqc_round == 2
    hiding = TimeoutCert(tc.epoch, tc.round, q1, tc.signatures)
    assert reason_of(lambda: hiding.verify(F.vset)) == "bad_high_qc"
    lying = TimeoutCert(tc.epoch, tc.round, q2, ((0, 2, tc.signatures[0][2]),) + tc.signatures[1:])
    assert reason_of(lambda: lying.verify(F.vset)) == "bad_signature"
    assert reason_of(lambda: TimeoutCert(0, 3, q2, tc.signatures[:2]).verify(F.vset)) == "no_quorum"


def test_timeout_signature_and_rounds_are_checked():
    (b1,) = F.chain([1])
    q1 = F.qc(b1)
    t = F.timeout(2, q1, 1)
    t.verify(F.vset)
    assert reason_of(lambda: replace(t, round=3).verify(F.vset)) == "bad_signature"
    assert reason_of(lambda: F.timeout(1, q1, 1).verify(F.vset)) == "bad_round"
    assert reason_of(lambda: replace(t, epoch=1).verify(F.vset)) == "wrong_epoch"


def sample_messages():
    b1, b2 = F.chain([1, 2])
    q1, q2 = F.qc(b1), F.qc(b2)
    return [
        Proposal(b2),
        Proposal(F.block(4, q2), F.tc(3, [q2, q1, q1])),
        VoteMsg(F.vote(b2, 1)),
        TimeoutMsg(F.timeout(3, q2, 2), F.tc(2, [q1, q1, q1])),
        SyncRequest(b2.id, 10),
        SyncResponse((b2, b1)),
    ]


@pytest.mark.parametrize("message", sample_messages(), ids=lambda m: type(m).__name__)
def test_messages_round_trip_through_the_wire(message):
    data = encode_message(message)
    decoded = decode_message(data)
    assert decoded == message
    assert encode_message(decoded) == data


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_mutated_messages_fail_only_with_typed_errors(data):
    message = data.draw(st.sampled_from(sample_messages()))
    raw = bytearray(encode_message(message))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    try:
        decoded = decode_message(bytes(raw))
    except CodecError:
        return
    # What still decodes must verify or be refused with a reason, never crash.
    for part in _verifiable(decoded):
        try:
            part.verify(F.vset)
        except InvalidMessage:
            pass


def _verifiable(message):
    if isinstance(message, Proposal):
        return [message.block] + ([message.tc] if message.tc else [])
    if isinstance(message, VoteMsg):
        return [message.vote]
    if isinstance(message, TimeoutMsg):
        return [message.timeout] + ([message.high_tc] if message.high_tc else [])
    if isinstance(message, SyncResponse):
        return list(message.blocks)
    return []


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_random_bytes_never_decode_into_a_message_by_accident(data):
    try:
        decode_message(data)
    except CodecError:
        return


def test_unknown_message_type_is_a_schema_error():
    with pytest.raises(CodecError, match="unknown message type"):
        decode_message(codec.encode({"type": "gossip", "body": {}}))
    with pytest.raises(CodecError, match="unexpected fields"):
        decode_message(codec.encode({"type": "vote", "body": {}, "extra": 1}))
