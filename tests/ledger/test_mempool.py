import dataclasses

import pytest

from ehrnode import codec, crypto
from ehrnode.consensus.types import Block
from ehrnode.errors import AdmissionError
from ehrnode.ledger.envelope import SIZE_BUCKETS, Envelope
from ehrnode.ledger.mempool import Mempool
from ehrnode.ledger.state import LedgerState
from ehrnode.ledger.transactions import Transaction

from ..consensus.factory import Factory
from .sealing import keyring, sealed

F = Factory()
KEYS = {"A": crypto.Identity.generate(), "B": crypto.Identity.generate()}
MEMBERS = {name: key.public_key for name, key in KEYS.items()}
EPOCHS = keyring("chain")


def note(text, submitter="A", chain="chain", key=None):
    return Transaction.create("note", {"text": text}, chain_id=chain, submitter=submitter,
                              identity=key or KEYS[submitter], time_ms=1)


def refused(pool, data):
    with pytest.raises(AdmissionError) as err:
        pool.admit(data)
    return err.value.reason


def test_admission_checks_and_their_reasons(tmp_path):
    state = LedgerState(tmp_path / "state.db", "chain", MEMBERS, keys=EPOCHS)
    pool = Mempool("chain", MEMBERS, opener=state.open_envelope, capacity=4)
    tx = note("hello")
    assert pool.admit(sealed(tx, EPOCHS)).id == tx.id and len(pool) == 1 and tx.id in pool
    assert refused(pool, sealed(tx, EPOCHS)) == "duplicate"  # the same transaction sealed again
    assert refused(pool, sealed(note("x", chain="other"), EPOCHS)) == "wrong_chain"
    assert refused(pool, sealed(note("x", submitter="A", key=KEYS["B"]), EPOCHS)) == "bad_signature"
    stranger = crypto.Identity.generate()
    assert refused(pool, sealed(Transaction.create("note", {"text": "x"}, chain_id="chain", submitter="Eve",
                                                   identity=stranger, time_ms=1), EPOCHS)) == "unknown_submitter"
    assert refused(pool, b"\xff garbage") == "malformed"
    assert refused(pool, codec.encode({"kind": "note"})) == "malformed"
    assert refused(pool, note("plain").encoded) == "malformed"  # a transaction not sealed
    assert refused(pool, b"\x00" * (70 * 1024)) == "too_large"
    assert refused(pool, sealed(note("x"), keyring("chain"))) == "undecryptable"  # another key
    other = keyring("chain")
    assert refused(pool, Envelope.seal(note("x"), epoch=1, key=other.aead(0), chain_id="chain").encoded) == (
        "future_epoch")
    # One member takes at most half the pool; the others keep the rest.
    second = sealed(note("second"), EPOCHS)
    pool.admit(second)
    assert refused(pool, sealed(note("third"), EPOCHS)) == "member_quota"
    for text in ("b1", "b2"):
        pool.admit(sealed(note(text, submitter="B"), EPOCHS))
    assert refused(pool, sealed(note("b3", submitter="B"), EPOCHS)) == "mempool_full"
    # A node asks before it builds and signs a transaction of its own: no room, no work.
    for submitter in ("A", "B"):
        with pytest.raises(AdmissionError) as err:
            pool.check_room(submitter)
        assert err.value.reason == "mempool_full"
    pool.remove([crypto.sha256(second)])
    with pytest.raises(AdmissionError) as err:
        pool.check_room("B")
    assert err.value.reason == "member_quota"
    pool.check_room("A")
    pool.admit(sealed(note("third"), EPOCHS))


def test_an_envelope_must_match_what_it_holds(tmp_path):
    state = LedgerState(tmp_path / "state.db", "chain", MEMBERS, keys=EPOCHS)
    pool = Mempool("chain", MEMBERS, opener=state.open_envelope)
    envelope = Envelope.decode(sealed(note("hi"), EPOCHS))
    key = EPOCHS.aead(0)
    # Another signer or class in clear than inside: the AEAD binds them, so it does not open.
    for changed in (dataclasses.replace(envelope, signer="B"), dataclasses.replace(envelope, kind_class="record")):
        assert refused(pool, changed.encoded) == "undecryptable"
    # Sealed honestly, but naming a signer that is not the transaction's.
    lying = Envelope("chain", 0, "B", envelope.nonce, b"")
    lying = dataclasses.replace(lying, ciphertext=key.encrypt(envelope.nonce, key.decrypt(
        envelope.nonce, envelope.ciphertext, envelope._associated("chain")), lying._associated("chain")))
    assert refused(pool, lying.encoded) == "envelope_mismatch"
    assert len(Envelope.decode(lying.encoded).ciphertext) - 16 in SIZE_BUCKETS


def test_committed_transactions_are_duplicates_and_bad_ones_are_recorded_as_invalid(tmp_path):
    state = LedgerState(tmp_path / "state.db", "chain", MEMBERS, keys=EPOCHS)
    good, forged = note("good"), note("forged", key=KEYS["B"])
    block = Block.propose(epoch=0, round=1, qc=F.genesis_qc, author=1, timestamp=0,
                          payload=(sealed(good, EPOCHS), sealed(forged, EPOCHS), sealed(good, EPOCHS), b"junk"),
                          identity=F.identities[1], chain_id=F.vset.chain_id)
    valid = state.apply(block)
    assert [tx.id for tx in valid] == [good.id]
    assert state.tx_height(good.id) == 1 and not state.is_committed(forged.id)
    assert state.tx_status(forged.id) == "invalid:bad_signature"
    assert state.tx_status(crypto.sha256(b"junk")) == "invalid:malformed"
    pool = Mempool("chain", MEMBERS, opener=state.open_envelope, is_committed=state.is_committed)
    assert refused(pool, sealed(good, EPOCHS)) == "duplicate"
    state.close()
    reopened = LedgerState(tmp_path / "state.db", "chain", MEMBERS, keys=EPOCHS)
    assert reopened.applied_height == 1 and reopened.tx_count() == 1


def test_an_envelope_a_block_carried_is_refused_without_being_opened_again(tmp_path):
    state = LedgerState(tmp_path / "state.db", "chain", MEMBERS, keys=EPOCHS)
    opened = []

    def opener(data, height=None):
        opened.append(data)
        return state.open_envelope(data, height)

    pool = Mempool("chain", MEMBERS, opener=opener, is_committed=state.is_committed)
    gossiped = sealed(note("late"), EPOCHS)
    pool.remove([crypto.sha256(gossiped)])  # committed in a block before this node got to its gossip
    assert refused(pool, gossiped) == "duplicate"
    assert opened == []
    assert pool.admit(sealed(note("other"), EPOCHS)) and len(opened) == 1
