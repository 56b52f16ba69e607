import pytest

from ehrnode import codec, crypto
from ehrnode.consensus.types import Block
from ehrnode.errors import AdmissionError
from ehrnode.ledger.mempool import Mempool
from ehrnode.ledger.state import LedgerState
from ehrnode.ledger.transactions import Transaction

from ..consensus.factory import Factory

F = Factory()
KEYS = {"A": crypto.Identity.generate(), "B": crypto.Identity.generate()}
MEMBERS = {name: key.public_key for name, key in KEYS.items()}


def note(text, submitter="A", chain="chain", key=None):
    return Transaction.create("note", {"text": text}, chain_id=chain, submitter=submitter,
                              identity=key or KEYS[submitter], time_ms=1)


def refused(pool, data):
    with pytest.raises(AdmissionError) as err:
        pool.admit(data)
    return err.value.reason


def test_admission_checks_and_their_reasons():
    pool = Mempool("chain", MEMBERS, capacity=2)
    tx = note("hello")
    assert pool.admit(tx.encoded).id == tx.id and len(pool) == 1
    assert refused(pool, tx.encoded) == "duplicate"
    assert refused(pool, note("x", chain="other").encoded) == "wrong_chain"
    assert refused(pool, note("x", submitter="A", key=KEYS["B"]).encoded) == "bad_signature"
    stranger = crypto.Identity.generate()
    assert refused(pool, Transaction.create("note", {"text": "x"}, chain_id="chain", submitter="Eve",
                                            identity=stranger, time_ms=1).encoded) == "unknown_submitter"
    assert refused(pool, b"\xff garbage") == "malformed"
    assert refused(pool, codec.encode({"kind": "note"})) == "malformed"
    assert refused(pool, b"\x00" * (70 * 1024)) == "too_large"
    pool.admit(note("second").encoded)
    assert refused(pool, note("third").encoded) == "mempool_full"
    pool.remove([tx.id])
    pool.admit(note("third").encoded)


def test_committed_transactions_are_duplicates_and_bad_ones_are_recorded_as_invalid(tmp_path):
    state = LedgerState(tmp_path / "state.db", "chain", MEMBERS)
    good, forged = note("good"), note("forged", key=KEYS["B"])
    block = Block.propose(epoch=0, round=1, qc=F.genesis_qc, author=1, timestamp=0,
                          payload=(good.encoded, forged.encoded, good.encoded, b"junk"),
                          identity=F.identities[1], chain_id=F.vset.chain_id)
    valid = state.apply(block)
    assert [tx.id for tx in valid] == [good.id]
    assert state.tx_height(good.id) == 1 and not state.is_committed(forged.id)
    pool = Mempool("chain", MEMBERS, is_committed=state.is_committed)
    assert refused(pool, good.encoded) == "duplicate"
    state.close()
    reopened = LedgerState(tmp_path / "state.db", "chain", MEMBERS)
    assert reopened.applied_height == 1 and reopened.tx_count() == 1
