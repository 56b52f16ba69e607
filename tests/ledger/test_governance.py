"""Governed membership on the ledger: proposals, votes, adoption at 2f+1, lapses, and a member
that joins later reading the chain from genesis with the keys re-sealed to it."""

import dataclasses

import pytest

from ehrnode import crypto
from ehrnode.config import Address, Member
from ehrnode.consensus.types import Block
from ehrnode.epochs import EpochGrant, EpochKeys
from ehrnode.errors import KeyUnavailable
from ehrnode.ledger.envelope import Envelope, public_key
from ehrnode.ledger.state import LedgerState
from ehrnode.ledger.transactions import Transaction
from ehrnode.membership import Membership

from ..consensus.factory import Factory

F = Factory()
CHAIN = "chain"
NAMES = ("A", "B", "C", "R", "D")  # D is not in genesis
SIGNING = {name: crypto.Identity.generate() for name in NAMES}
SEALING = {name: crypto.SealingKey.generate() for name in NAMES}


def member(name, role="institution", port=7000):
    return Member(name, "regulator" if name == "R" else role, SIGNING[name].public_key, SEALING[name].public_key,
                  Address("127.0.0.1", port))


GENESIS = Membership(0, 0, tuple(member(n) for n in ("A", "B", "C", "R")))
EPOCH_0 = EpochGrant.create(CHAIN, 0, GENESIS.sealing_keys)


def tx(kind, body, submitter="A", time_ms=1):
    return Transaction.create(kind, body, chain_id=CHAIN, submitter=submitter, identity=SIGNING[submitter],
                              time_ms=time_ms)


class Node:
    def __init__(self, path, name):
        self.keys = EpochKeys(CHAIN, name, SEALING[name])
        self.keys.learn(EPOCH_0)
        self.state = LedgerState(path, CHAIN, GENESIS, keys=self.keys)

    def block(self, *entries):
        height = self.state.public_height + 1
        block = Block.propose(epoch=0, round=height, qc=F.genesis_qc, author=1, timestamp=height * 1000,
                              payload=entries, identity=F.identities[1], chain_id=F.vset.chain_id)
        return dataclasses.replace(block, height=height)

    def apply(self, *entries):
        return self.state.apply(self.block(*entries))


def propose_add(name="D", submitter="A", *, keys, epochs=1):
    return tx("consortium.propose", {
        "change": "add", "name": name, "role": "institution", "reason": "joins the network",
        "signing_key": SIGNING[name].public_key, "sealing_key": SEALING[name].public_key,
        "address": "127.0.0.1:7004", "history": keys.history_for(SEALING[name].public_key, epochs)}, submitter)


def vote(proposal, voter):
    return tx("consortium.vote", {"proposal": proposal.id}, voter)


def test_an_add_is_adopted_at_2f_plus_1_and_the_next_epoch_has_the_new_member(tmp_path):
    a = Node(tmp_path / "a.db", "A")
    add = propose_add(keys=a.keys)
    seal = a.state.seal
    a.apply(seal(add).encoded, seal(vote(add, "B")).encoded)
    assert a.state.membership.epoch == 0  # 2 of 4: not yet
    [view] = a.state.governance.proposals()
    assert view["status"] == "open" and view["voters"] == ["A", "B"] and view["needed"] == 3
    late = propose_add("D", submitter="B", keys=a.keys)  # a second, concurrent proposal
    too_late = vote(late, "C")
    a.apply(seal(late).encoded, seal(vote(add, "R")).encoded, seal(too_late).encoded)
    adopted_at = a.state.public_height
    after = a.state.membership
    assert after.epoch == 1 and after.starts == adopted_at + 1 and after.names == ["A", "B", "C", "R", "D"]
    assert after.quorum == 4 and a.state.membership_at(adopted_at).epoch == 0
    statuses = {p["id"]: p["status"] for p in a.state.governance.proposals()}
    assert statuses == {add.id: "adopted", late.id: "lapsed"}
    # The vote after the adoption in the same block lapses with it; later ones find it decided.
    assert a.state.tx_status(too_late.id) == "invalid:epoch_ended"
    decided = vote(add, "C")
    a.apply(seal(decided).encoded)
    assert a.state.tx_status(decided.id) == "invalid:decided"
    # D is a member from the next block: its transactions count, and its role with them.
    note = tx("note", {"text": "hello from D"}, "D")
    assert [t.id for t in a.apply(seal(note).encoded)] == [note.id]
    # Restarted, the memberships are read back.
    a.state.close()
    again = LedgerState(tmp_path / "a.db", CHAIN, GENESIS, keys=a.keys)
    assert again.membership == after


def test_refusals_are_recorded_the_same_everywhere(tmp_path):
    a = Node(tmp_path / "a.db", "A")
    seal = a.state.seal
    bogus = tx("consortium.vote", {"proposal": b"\x01" * 32}, "B")
    taken = propose_add("D", keys=a.keys)
    taken = tx("consortium.propose", dict(taken.body, name="C"), "A")  # already a member
    long = tx("consortium.propose", dict(propose_add(keys=a.keys).body,
                                         history=a.keys.history_for(SEALING["D"].public_key, 1) * 2), "A")
    reused = tx("consortium.propose", dict(propose_add(keys=a.keys).body, signing_key=SIGNING["B"].public_key), "A")
    nobody = tx("consortium.propose", {"change": "remove", "name": "Z", "reason": "?"}, "A")
    outsider = propose_add("D", submitter="D", keys=a.keys)
    a.apply(*(seal(t).encoded for t in (bogus, taken, long, reused, nobody, outsider)))
    assert [a.state.tx_status(t.id) for t in (bogus, taken, long, reused, nobody, outsider)] == [
        "invalid:unknown_proposal", "invalid:name_taken", "invalid:history", "invalid:key_reused",
        "invalid:not_member", "invalid:unknown_submitter"]
    remove = tx("consortium.propose", {"change": "remove", "name": "C", "reason": "left"}, "A")
    again = vote(remove, "A")
    a.apply(seal(remove).encoded, seal(again).encoded)
    assert a.state.tx_status(again.id) == "invalid:duplicate_vote"


def test_a_new_epoch_key_lapses_an_add_whose_history_lacks_it(tmp_path):
    a = Node(tmp_path / "a.db", "A")
    add = propose_add(keys=a.keys)
    grant = EpochGrant.create(CHAIN, 1, GENESIS.sealing_keys)
    rotate = tx("keys.epoch", grant.body(), "B")
    a.apply(a.state.seal(add).encoded, a.state.seal(rotate).encoded)
    votes = vote(add, "B"), vote(add, "C")
    a.apply(*(a.state.seal(v).encoded for v in votes))
    assert [a.state.tx_status(v.id) for v in votes] == ["invalid:decided"] * 2
    assert a.state.membership.epoch == 0
    # Proposed again with both keys, it is adopted.
    again = propose_add(keys=a.keys, epochs=2)
    a.apply(*(a.state.seal(t).encoded for t in (again, vote(again, "B"), vote(again, "C"))))
    assert a.state.membership.names == ["A", "B", "C", "R", "D"]


def test_a_removed_member_gets_no_later_key_and_its_transactions_no_longer_count(tmp_path):
    a, c = Node(tmp_path / "a.db", "A"), Node(tmp_path / "c.db", "C")
    remove = tx("consortium.propose", {"change": "remove", "name": "C", "reason": "left the network"}, "A")
    votes = (vote(remove, "B"), vote(remove, "R"))
    for node in (a, c):
        node.apply(*(node.state.seal(t).encoded for t in (remove, *votes)))
        assert node.state.membership.names == ["A", "B", "R"] and node.state.membership.quorum == 3
    # A grant that still seals to C is refused; one to the remaining members opens epoch 1.
    old_set = tx("keys.epoch", EpochGrant.create(CHAIN, 1, GENESIS.sealing_keys).body(), "A", time_ms=2)
    remaining = {n: k for n, k in GENESIS.sealing_keys.items() if n != "C"}
    new_set = tx("keys.epoch", EpochGrant.create(CHAIN, 1, remaining).body(), "A", time_ms=3)
    late = tx("note", {"text": "still here"}, "C")
    for node in (a, c):
        node.apply(*(node.state.seal(t).encoded for t in (old_set, new_set, late)))
        assert node.state.tx_status(old_set.id) == "invalid:grants"
        assert node.state.tx_status(new_set.id) == "ok"
        assert node.state.tx_status(late.id) == "invalid:unknown_submitter"
    assert 1 in a.keys and 1 not in c.keys
    secret = a.state.seal(tx("note", {"text": "after C left"}, "B")).encoded
    assert a.apply(secret)[0].body["text"] == "after C left"
    with pytest.raises(KeyUnavailable):
        c.apply(secret)


def test_a_member_that_joins_later_reads_the_chain_from_genesis(tmp_path):
    a = Node(tmp_path / "a.db", "A")
    blocks = []

    def commit(*txs):
        block = a.block(*(a.state.seal(t).encoded for t in txs))
        a.state.apply(block)
        blocks.append(block)

    commit(tx("note", {"text": "before D"}, "B"))
    commit(tx("keys.epoch", EpochGrant.create(CHAIN, 1, GENESIS.sealing_keys).body(), "C"))
    commit(tx("note", {"text": "epoch one"}, "R"))
    add = propose_add(keys=a.keys, epochs=2)
    commit(add, vote(add, "B"), vote(add, "C"))
    joined = a.state.membership
    commit(tx("keys.epoch", EpochGrant.create(CHAIN, 2, joined.sealing_keys).body(), "B"))
    commit(tx("note", {"text": "with D"}, "D"))
    # D starts with genesis, which seals it nothing: it can follow the public part only.
    d_keys = EpochKeys(CHAIN, "D", SEALING["D"])
    assert not d_keys.learn(EPOCH_0)
    d = LedgerState(tmp_path / "d.db", CHAIN, GENESIS, keys=d_keys)
    with pytest.raises(KeyUnavailable):
        d.apply(blocks[0])
    for block in blocks:
        d.apply_public(block)
    assert d_keys.epochs == [0, 1, 2] and d.membership == joined
    texts = [t.body.get("text") for block in blocks for t in d.apply(block)]
    assert texts == ["before D", None, "epoch one", None, None, None, None, "with D"]
    assert [e["epoch"] for e in d.epochs()] == [0, 1, 2]


def test_a_forged_history_copy_is_not_taken(tmp_path):
    a = Node(tmp_path / "a.db", "A")
    forged = tx("consortium.propose", dict(propose_add(keys=a.keys).body, history=[
        crypto.seal_to(SEALING["D"].public_key, b"\x00" * 32, b"anything")]), "B")
    for t in (forged, vote(forged, "A"), vote(forged, "C")):
        a.apply(a.state.seal(t).encoded)
    d_keys = EpochKeys(CHAIN, "D", SEALING["D"])
    d_keys.learn(EPOCH_0)
    d = LedgerState(tmp_path / "d.db", CHAIN, GENESIS, keys=d_keys)
    assert d_keys.epochs == [] and 0 in d_keys.unreadable
    d.close()


def test_governance_is_sealed_under_the_public_key_only(tmp_path):
    a = Node(tmp_path / "a.db", "A")
    add = propose_add(keys=a.keys)
    public = a.state.seal(add)
    assert public.kind_class == "consortium"
    assert public.open(public_key(CHAIN, 0), CHAIN) == add  # anyone with the chain id
    hidden = Envelope.seal(add, epoch=0, key=a.keys.aead(0), chain_id=CHAIN)  # under the epoch key instead
    a.apply(hidden.encoded)
    assert a.state.tx_status(hidden.id) == "invalid:undecryptable"


def test_rotate_key_replaces_a_members_keys_and_reseals_history_to_the_new_one(tmp_path):
    a = Node(tmp_path / "a.db", "A")
    new_signing, new_sealing = crypto.Identity.generate(), crypto.SealingKey.generate()
    rekey = tx("consortium.propose", {
        "change": "rotate-key", "name": "B", "reason": "key compromised", "signing_key": new_signing.public_key,
        "sealing_key": new_sealing.public_key, "address": "127.0.0.1:7999",
        "history": a.keys.history_for(new_sealing.public_key, 1)}, "A")
    a.apply(*(a.state.seal(t).encoded for t in (rekey, vote(rekey, "C"), vote(rekey, "R"))))
    b = a.state.membership.member("B")
    assert (b.signing_key, b.sealing_key, str(b.address), b.role) == (
        new_signing.public_key, new_sealing.public_key, "127.0.0.1:7999", "institution")
    old = tx("note", {"text": "old key"}, "B")
    new = Transaction.create("note", {"text": "new key"}, chain_id=CHAIN, submitter="B", identity=new_signing,
                             time_ms=1)
    a.apply(a.state.seal(old).encoded, a.state.seal(new).encoded)
    assert (a.state.tx_status(old.id), a.state.tx_status(new.id)) == ("invalid:bad_signature", "ok")
    # B's node, restarted with its new sealing key, reads epoch 0 from the re-sealed copy.
    b_keys = EpochKeys(CHAIN, "B", new_sealing)
    assert not b_keys.learn(EPOCH_0)
    a.state.close()
    LedgerState(tmp_path / "a.db", CHAIN, GENESIS, keys=b_keys).close()
    assert b_keys.epochs == [0]


def test_a_member_whose_copy_is_bad_takes_a_copy_sealed_again(tmp_path):
    a, r = Node(tmp_path / "a.db", "A"), Node(tmp_path / "r.db", "R")
    grant = EpochGrant.create(CHAIN, 1, GENESIS.sealing_keys)
    wrong = EpochGrant.create(CHAIN, 1, {"R": SEALING["R"].public_key})
    bad = tx("keys.epoch", {**grant.body(), "sealed": {**grant.sealed, "R": wrong.sealed["R"]}}, "B")
    for node in (a, r):
        node.apply(node.state.seal(bad).encoded)
    assert 1 in a.keys and 1 not in r.keys
    request = tx("keys.request", {"epoch": 1}, "R")
    ahead = tx("keys.request", {"epoch": 2}, "R")
    forged = tx("keys.reseal", {"epoch": 1, "member": "R", "sealed": wrong.sealed["R"]}, "B")  # B again
    stranger = tx("keys.reseal", {"epoch": 1, "member": "Z", "sealed": b"x" * 92}, "A")
    good = tx("keys.reseal", {"epoch": 1, "member": "R", "sealed": a.keys.reseal(1, SEALING["R"].public_key)}, "A")
    for node in (a, r):
        node.apply(*(node.state.seal(t).encoded for t in (request, ahead, forged, stranger)))
        assert [node.state.tx_status(t.id) for t in (request, ahead, forged, stranger)] == [
            "ok", "invalid:future_epoch", "ok", "invalid:not_member"]
    assert 1 not in r.keys and "check value" in r.keys.unreadable[1]  # the forged copy is not taken
    for node in (a, r):
        node.apply(node.state.seal(good).encoded)
    assert 1 in r.keys and 1 not in r.keys.unreadable
    # Taken again from the chain after a restart.
    r.state.close()
    again = EpochKeys(CHAIN, "R", SEALING["R"])
    again.learn(EPOCH_0)
    LedgerState(tmp_path / "r.db", CHAIN, GENESIS, keys=again).close()
    assert again.epochs == [0, 1]
