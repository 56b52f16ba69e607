"""Epoch keys on the ledger: grants, rotation, the one-epoch grace, members left out, mixing."""

import dataclasses

import pytest

from ehrnode import crypto
from ehrnode.consensus.types import Block
from ehrnode.epochs import EpochGrant, EpochKeys
from ehrnode.errors import KeyUnavailable
from ehrnode.ledger.envelope import Envelope, bucket, mix
from ehrnode.ledger.state import LedgerState
from ehrnode.ledger.transactions import MAX_TX_BYTES, Transaction

from ..consensus.factory import Factory

F = Factory()
CHAIN = "chain"
NAMES = ("A", "B", "R")
SIGNING = {name: crypto.Identity.generate() for name in NAMES}
SEALING = {name: crypto.SealingKey.generate() for name in NAMES}
MEMBERS = {name: key.public_key for name, key in SIGNING.items()}
ROLES = {"A": "institution", "B": "institution", "R": "regulator"}
GENESIS = EpochGrant.create(CHAIN, 0, {n: k.public_key for n, k in SEALING.items()})


def keys_of(name):
    keys = EpochKeys(CHAIN, name, SEALING[name])
    assert keys.learn(GENESIS)
    return keys


def note(text, submitter="A"):
    return Transaction.create("note", {"text": text}, chain_id=CHAIN, submitter=submitter,
                              identity=SIGNING[submitter], time_ms=1)


class Node:
    """One member's ledger state, fed blocks of envelopes."""

    def __init__(self, path, name):
        self.keys = keys_of(name)
        self.state = LedgerState(path, CHAIN, MEMBERS, roles=ROLES, keys=self.keys)

    def apply(self, *entries):
        height = self.state.applied_height + 1
        block = Block.propose(epoch=0, round=height, qc=F.genesis_qc, author=1, timestamp=height * 1000,
                              payload=entries, identity=F.identities[1], chain_id=F.vset.chain_id)
        return self.state.apply(dataclasses.replace(block, height=height))

    def status(self, entry):
        row = self.state._db.execute("SELECT status FROM txs WHERE id = ? OR id = ?",
                                     (crypto.sha256(entry), self.opened(entry))).fetchone()
        return row[0] if row else None

    def opened(self, entry):
        try:
            return self.state.open_envelope(entry, self.state.applied_height)[1].id
        except Exception:  # noqa: BLE001 - not readable: the envelope's own id
            return b""


def rotation(epoch, submitter="A", recipients=NAMES):
    grant = EpochGrant.create(CHAIN, epoch, {n: SEALING[n].public_key for n in recipients})
    return grant, Transaction.create("keys.epoch", grant.body(), chain_id=CHAIN, submitter=submitter,
                                     identity=SIGNING[submitter], time_ms=1)


def test_a_rotation_opens_the_next_epoch_with_one_epoch_of_grace(tmp_path):
    a, b = Node(tmp_path / "a.db", "A"), Node(tmp_path / "b.db", "B")
    grant, rotate = rotation(1)
    for node in (a, b):
        node.apply(node.state.seal(rotate).encoded)
        assert node.state.current_epoch == 1 and node.keys.epochs == [0, 1]
    late = Envelope.seal(note("in flight"), epoch=0, key=a.keys.aead(0), chain_id=CHAIN).encoded
    fresh = a.state.seal(note("after")).encoded
    assert Envelope.decode(fresh).epoch == 1
    # The second grant for epoch 1 lost the race; one for epoch 3 skips a number.
    _, again = rotation(1, submitter="B")
    _, skip = rotation(3)
    for node in (a, b):
        valid = node.apply(late, fresh, node.state.seal(again).encoded, node.state.seal(skip).encoded)
        assert [tx.body.get("text") for tx in valid] == ["in flight", "after"]
        assert node.state.tx_status(again.id) == "invalid:stale_epoch" == node.state.tx_status(skip.id)
    # Two epochs on, the old key is no longer accepted, and the grace applies to epoch 1.
    _, second = rotation(2, submitter="R")
    for node in (a, b):
        node.apply(node.state.seal(second).encoded)
    stale = Envelope.seal(note("too late"), epoch=0, key=a.keys.aead(0), chain_id=CHAIN).encoded
    graced = Envelope.seal(note("graced"), epoch=1, key=a.keys.aead(1), chain_id=CHAIN).encoded
    for node in (a, b):
        assert [tx.body["text"] for tx in node.apply(stale, graced)] == ["graced"]
        assert node.state.tx_status(crypto.sha256(stale)) == "invalid:stale_epoch"
    assert [(e["epoch"], e["starts"], e["opened_by"]) for e in a.state.epochs()] == [
        (0, 1, "genesis"), (1, 2, "A"), (2, 4, "R")]
    # After a restart, every key is opened again from the grants on the chain.
    a.state.close()
    again_keys = keys_of("A")
    reopened = LedgerState(tmp_path / "a.db", CHAIN, MEMBERS, roles=ROLES, keys=again_keys)
    assert again_keys.epochs == [0, 1, 2] and reopened.current_epoch == 2


def test_a_grant_must_seal_to_exactly_the_current_members(tmp_path):
    a = Node(tmp_path / "a.db", "A")
    _, partial = rotation(1, recipients=("A", "B"))
    _, stranger = rotation(1)
    body = dict(stranger.body, sealed={**stranger.body["sealed"], "Eve": b"x" * 80})
    extra = Transaction.create("keys.epoch", body, chain_id=CHAIN, submitter="A", identity=SIGNING["A"], time_ms=2)
    a.apply(a.state.seal(partial).encoded, a.state.seal(extra).encoded)
    assert a.state.tx_status(partial.id) == a.state.tx_status(extra.id) == "invalid:grants"
    assert a.state.current_epoch == 0


def test_a_member_without_a_good_copy_stops_instead_of_judging_differently(tmp_path):
    a, r = Node(tmp_path / "a.db", "A"), Node(tmp_path / "r.db", "R")
    grant, rotate = rotation(1)
    # A Byzantine member seals R a different key than the one the check value commits to.
    wrong = EpochGrant.create(CHAIN, 1, {"R": SEALING["R"].public_key})
    body = dict(rotate.body, sealed={**grant.sealed, "R": wrong.sealed["R"]})
    bad = Transaction.create("keys.epoch", body, chain_id=CHAIN, submitter="B", identity=SIGNING["B"], time_ms=3)
    for node in (a, r):
        node.apply(node.state.seal(bad).encoded)
        assert node.state.tx_status(bad.id) == "ok"  # every node agrees it is on chain
    assert 1 in a.keys and 1 not in r.keys and "check value" in r.keys.unreadable[1]
    entry = a.state.seal(note("epoch one")).encoded
    assert [tx.body["text"] for tx in a.apply(entry)] == ["epoch one"]
    with pytest.raises(KeyUnavailable):
        r.apply(entry)
    assert r.state.applied_height == 1  # nothing of that block applied
    with pytest.raises(KeyUnavailable):
        r.state.seal(note("x"))


def test_a_key_opens_only_for_its_member_and_epoch():
    grant = EpochGrant.create(CHAIN, 4, {"A": SEALING["A"].public_key})
    assert not EpochKeys(CHAIN, "B", SEALING["B"]).learn(grant)  # no copy for B
    thief = EpochKeys(CHAIN, "A", SEALING["B"])  # A's copy, the wrong private key
    assert not thief.learn(grant) and "does not open" in thief.unreadable[4]
    moved = dataclasses.replace(grant, epoch=5)  # A's copy replayed as another epoch's
    assert not EpochKeys(CHAIN, "A", SEALING["A"]).learn(moved)
    assert EpochKeys(CHAIN, "A", SEALING["A"]).learn(grant)


def test_envelopes_show_only_a_bucket_class_epoch_and_signer(tmp_path):
    a = Node(tmp_path / "a.db", "A")
    sizes = set()
    for text in ("secret x", "secret " + "y" * 20, "secret " + "z" * 40):
        envelope = a.state.seal(note(text))
        assert envelope.kind_class == "chain" and envelope.signer == "A" and envelope.epoch == 0
        assert b"secret" not in envelope.encoded
        sizes.add(len(envelope.ciphertext))
    assert len(sizes) == 1  # three sizes of note, one bucket
    assert [bucket(n) for n in (0, 255, 256, 30_000, 40_000, MAX_TX_BYTES)] == [
        256, 256, 512, 32768, MAX_TX_BYTES + 1, MAX_TX_BYTES + 1]


def test_mixing_keeps_each_signers_order_and_depends_only_on_the_seed(tmp_path):
    a = Node(tmp_path / "a.db", "A")
    entries = [a.state.seal(note(f"{who}{i}", who)).encoded for i in range(12) for who in ("A", "B", "R")]
    first = mix(entries, b"s" * 32)
    assert sorted(first) == sorted(entries) and first == mix(list(entries), b"s" * 32)
    assert first != entries and first != mix(entries, b"t" * 32)
    texts = [tx.body["text"] for tx in a.apply(*first)]
    for who in ("A", "B", "R"):
        assert [t for t in texts if t[0] == who] == [f"{who}{i}" for i in range(12)]
    assert mix([b"junk", entries[0]], b"s" * 32) in ([b"junk", entries[0]], [entries[0], b"junk"])
