"""The acting user on chain: the actor field, the actions index, and whois requests and answers."""

import dataclasses

import pytest

from ehrnode import codec, crypto
from ehrnode.consensus.types import Block
from ehrnode.errors import SchemaError
from ehrnode.ledger.transactions import Transaction

from .sealing import sealed
from .test_empi_registry import EPOCHS, KEYS, Chain, F, tx

ANA = b"a" * 15


def acted(kind, body, submitter="A", actor=ANA):
    return Transaction.create(kind, body, chain_id=F.vset.chain_id, submitter=submitter,
                              identity=KEYS[submitter], time_ms=1, actor=actor)


def test_the_actor_is_signed_indexed_and_strictly_sized(tmp_path):
    chain = Chain(tmp_path / "state.db")
    note = acted("note", {"text": "hello"})
    plain = tx("note", {"text": "hello"})
    assert Transaction.decode(note.encoded) == note and Transaction.decode(plain.encoded).actor == b""
    assert chain.apply(note, plain) == ["ok", "ok"]
    assert [(a["kind"], a["submitter"]) for a in chain.state.actions(ANA)] == [("note", "A")]
    assert chain.state.actor_of(note.id) == ANA and chain.state.actor_of(plain.id) == b""
    with pytest.raises(SchemaError, match="actor"):
        acted("note", {"text": "x"}, actor=b"short")
    wire = codec.decode(note.encoded)
    wire["actor"] = b"a" * 16
    with pytest.raises(SchemaError, match="actor"):
        Transaction.decode(codec.encode(wire))
    # The actor is signed: changing it breaks the signature.
    wire["actor"] = b"b" * 15
    forged = codec.encode(wire)
    chain.height += 1
    block = Block.propose(epoch=0, round=chain.height, qc=F.genesis_qc, author=1, timestamp=0,
                          payload=(sealed(Transaction.decode(forged), EPOCHS),),
                          identity=F.identities[1], chain_id=F.vset.chain_id)
    chain.state.apply(dataclasses.replace(block, height=chain.height))
    assert chain.state.tx_status(crypto.sha256(forged)) == "invalid:bad_signature"


def test_whois_requests_go_to_another_institution_and_are_answered_once_by_it(tmp_path):
    chain = Chain(tmp_path / "state.db")

    def request(institution="B", submitter="R"):
        return acted("whois.request", {"epoch": 0, "institution": institution, "pseudonym": ANA,
                                       "case": "inspection 7"}, submitter, actor=b"r" * 15)

    def answer(req, submitter="B", reason="granted", sealed=b"s" * 80):
        return tx("whois.answer", {"epoch": 0, "request": req.id, "reason": reason, "sealed": sealed}, submitter)

    asked = request()
    assert chain.apply(asked, request(institution="R"), request(institution="A", submitter="A")) == [
        "ok", "invalid:unknown_institution", "invalid:own_institution"]
    assert chain.apply(answer(asked, submitter="A"), answer(asked, submitter="R")) == [
        "invalid:not_addressed", "invalid:role"]
    first = answer(asked)
    assert chain.apply(first) == ["ok"]
    assert chain.apply(answer(asked, reason="policy", sealed=b"")) == ["invalid:already_answered"]
    rows = chain.state.whois.requests(pseudonym=ANA)
    assert [(r["asker"], r["actor"], r["reason"], r["answer"]) for r in rows] == [("R", b"r" * 15, "granted",
                                                                                   first.id)]
    with pytest.raises(SchemaError, match="sealed"):
        answer(asked, reason="policy")  # a refusal carries nothing sealed
    with pytest.raises(SchemaError, match="case"):
        acted("whois.request", {"epoch": 0, "institution": "B", "pseudonym": ANA, "case": " "}, "R")


def test_transactions_and_requests_from_before_users_read_unchanged(tmp_path):
    from ehrnode.ledger.requests import PullRequest

    plain = tx("note", {"text": "written before users"})
    wire = codec.decode(plain.encoded)
    assert "actor" not in wire  # the node acting by itself writes no actor: old bytes, old id
    assert Transaction.decode(plain.encoded).id == plain.id
    wire["actor"] = b""
    with pytest.raises(SchemaError, match="actor"):  # one encoding per value: an empty actor is absent
        Transaction.decode(codec.encode(wire))
    old = {"chain": "c", "requester": "B", "owner": "A", "record": b"r" * 16, "purpose": "treatment",
           "nonce": b"n" * 16, "time": 5, "sig": b"s" * 64}
    request = PullRequest.decode(codec.encode(old))
    assert (request.user, request.role) == (b"", "") and request.encode() == codec.encode(old)
    with pytest.raises(SchemaError, match="both"):
        PullRequest.decode(codec.encode({**old, "user": b"u" * 15}))
    with pytest.raises(SchemaError, match="role"):
        PullRequest.decode(codec.encode({**old, "user": b"u" * 15, "role": "clinician\n"}))


def test_a_ledger_state_written_before_users_gains_their_columns(tmp_path):
    import sqlite3

    from ehrnode.ledger.state import LedgerState

    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.executescript("""CREATE TABLE accesses (
        request BLOB PRIMARY KEY, signed BLOB NOT NULL, record BLOB NOT NULL, owner TEXT NOT NULL,
        requester TEXT NOT NULL, purpose TEXT NOT NULL, decision TEXT NOT NULL, reason TEXT NOT NULL,
        consent BLOB NOT NULL, requested_at INTEGER NOT NULL, time INTEGER NOT NULL, height INTEGER NOT NULL,
        tx_id BLOB NOT NULL UNIQUE);
        INSERT INTO accesses VALUES (x'01', x'02', x'03', 'A', 'B', 'treatment', 'granted', 'granted', x'', 1, 2,
                                     3, x'04');""")
    db.commit()
    db.close()
    state = LedgerState(path, "c", {})
    (row,) = state.access.accesses()
    assert (row["requester"], row["user"], row["user_role"], row["purpose"]) == ("B", b"", "", "treatment")
    assert state.access.accesses(user=b"") == [row]
