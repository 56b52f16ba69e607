"""The ledger state machine on record anchors: who may anchor what, and the indexes every node builds."""

import pytest

from ehrnode import crypto
from ehrnode.consensus.types import Block
from ehrnode.errors import SchemaError, StoreError
from ehrnode.ledger.empi_registry import scoped_enrolment
from ehrnode.ledger.state import LedgerState
from ehrnode.ledger.transactions import Transaction

from ..consensus.factory import Factory
from .sealing import keyring, sealed

F = Factory()
KEYS = {name: crypto.Identity.generate() for name in ("A", "B", "R")}
MEMBERS = {name: key.public_key for name, key in KEYS.items()}
ROLES = {"A": "institution", "B": "institution", "R": "regulator"}
EPOCHS = keyring("chain")


def anchor_fields(*, record=1, position=1, patient=b"q" * 16, **fields):
    return {
        "record": record.to_bytes(16, "big"), "patient": patient, "recorded_at": 1_699_920_000_000, "setting": "AMB",
        "resource_type": "Condition", "commitment": bytes([record]) * 32, "position": position, "entry": bytes(32),
    } | fields


def anchor(submitter="A", *, institution=None, **fields):
    body = {"epoch": 0, "institution": institution or submitter} | anchor_fields(**fields)
    return Transaction.create("record.anchor", body, chain_id="chain", submitter=submitter,
                              identity=KEYS[submitter], time_ms=1)


def block(height_round, *txs, parent_qc=None):
    return Block.propose(epoch=0, round=height_round, qc=parent_qc or F.genesis_qc, author=1, timestamp=0,
                         payload=tuple(sealed(tx, EPOCHS) for tx in txs), identity=F.identities[1],
                         chain_id=F.vset.chain_id)


def statuses(state, txs):
    rows = dict(state._db.execute("SELECT id, status FROM txs").fetchall())
    return [rows[tx.id] for tx in txs]


def test_anchors_are_indexed_and_invalid_ones_refused_alike_everywhere(tmp_path):
    txs = [
        anchor("A", record=1, position=1),
        anchor("B", record=2, position=1),  # another institution's position 1: fine
        anchor("R", record=3, position=1),  # the regulator does not record
        anchor("A", institution="B", record=4, position=2),  # A cannot anchor for B
        anchor("A", record=1, position=3),  # a record id anchored before
        anchor("A", record=5, position=1),  # A's position 1 is taken
        anchor("A", record=6, position=2, patient=b"z" * 16),
    ]
    expected = ["ok", "ok", "invalid:role", "invalid:not_owner", "invalid:duplicate_record",
                "invalid:duplicate_record", "ok"]
    views = []
    for node in ("n1", "n2"):
        state = LedgerState(tmp_path / f"{node}.db", F.vset.chain_id, MEMBERS, roles=ROLES, keys=EPOCHS)
        # Same chain id for the transactions: they were made for "chain".
        state.chain_id = "chain"
        valid = state.apply(block(1, *txs))
        assert statuses(state, txs) == expected
        assert [tx.id for tx in valid] == [txs[i].id for i, s in enumerate(expected) if s == "ok"]
        views.append((state.anchors(), [a for a in state.anchors() if a["patient"] in (
                          scoped_enrolment("A", b"q" * 16), scoped_enrolment("B", b"q" * 16))],
                      state.anchored_positions("A")))
        state.close()
    assert views[0] == views[1]
    everything, by_empi, positions = views[0]
    assert [a["record"] for a in everything] == [(1).to_bytes(16, "big"), (2).to_bytes(16, "big"),
                                                 (6).to_bytes(16, "big")]
    assert {a["institution"] for a in by_empi} == {"A", "B"}
    assert positions == {1: ((1).to_bytes(16, "big"), bytes([1]) * 32, bytes(32)),
                         2: ((6).to_bytes(16, "big"), bytes([6]) * 32, bytes(32))}
    assert all(a["height"] == 1 for a in everything)


@pytest.mark.parametrize("field,value,message", [
    ("setting", "Ambulatory care, Boston", "short code"),
    ("resource_type", "patient", "resource type"),
    ("position", 0, "start at 1"),
    ("entry", b"\x01" * 15, "32 bytes"),
    ("commitment", b"\x01" * 31, "32 bytes"),
    ("patient", b"p" * 15, "16 bytes"),
    ("recorded_at", 1_699_920_000_001, "whole UTC day"),  # a time of day would date the care
])
def test_anchor_schema_refuses_free_text_and_wrong_sizes(field, value, message):
    with pytest.raises(SchemaError, match=message):
        anchor(**{field: value})


def test_anchor_schema_refuses_extra_fields():
    body = dict(anchor().body, name="Jane Doe")
    with pytest.raises(SchemaError):
        Transaction.create("record.anchor", body, chain_id="chain", submitter="A", identity=KEYS["A"], time_ms=1)


def anchors(submitter="A", *entries, institution=None):
    """A ``record.anchors`` of ``(record, position)`` pairs (or dicts of fields to change)."""
    body = [anchor_fields(**(entry if isinstance(entry, dict) else {"record": entry[0], "position": entry[1]}))
            for entry in entries]
    return Transaction.create("record.anchors", {"epoch": 0, "institution": institution or submitter,
                                                 "anchors": body},
                              chain_id="chain", submitter=submitter, identity=KEYS[submitter], time_ms=1)


def test_a_batch_of_anchors_is_applied_whole_or_not_at_all(tmp_path):
    txs = [
        anchor("A", record=1, position=1),
        anchors("A", (2, 2), (3, 3), (4, 4)),
        anchors("B", (5, 1), (6, 2)),
        anchors("A", (7, 5), (1, 6)),  # record 1 is anchored: none of the two is
        anchors("A", (8, 4), (9, 7)),  # position 4 is taken: none of the two
        anchors("R", (10, 1)),  # the regulator does not record
        anchors("A", (11, 1), institution="B"),  # A cannot anchor for B
        anchors("A", (12, 5)),  # position 5 is still free: the refused batches took nothing
    ]
    expected = ["ok", "ok", "ok", "invalid:duplicate_record", "invalid:duplicate_record", "invalid:role",
                "invalid:not_owner", "ok"]
    state = LedgerState(tmp_path / "n.db", F.vset.chain_id, MEMBERS, roles=ROLES, keys=EPOCHS)
    state.chain_id = "chain"
    valid = state.apply(block(1, *txs))
    assert statuses(state, txs) == expected
    assert [tx.id for tx in valid] == [txs[i].id for i, s in enumerate(expected) if s == "ok"]
    assert [int.from_bytes(a["record"], "big") for a in state.anchors()] == [1, 2, 3, 4, 5, 6, 12]
    assert [a["position"] for a in state.anchors(tx_id=txs[1].id)] == [2, 3, 4]
    assert {a["institution"] for a in state.anchors(tx_id=txs[2].id)} == {"B"}
    assert sorted(state.anchored_positions("A")) == [1, 2, 3, 4, 5]
    state.close()


@pytest.mark.parametrize("entries,message", [
    ([], "at least one anchor"),
    ([(1, 2), (2, 2)], "positions must ascend"),
    ([(1, 3), (2, 2)], "positions must ascend"),
    ([(1, 1), (1, 2)], "anchored twice"),
    ([(i, i) for i in range(1, 130)], "exceeds 128"),
    ([(1, 1), {"record": 2, "position": 2, "setting": "Ward 7, Dr Smith"}], r"anchors\[1\].setting"),
    ([{"record": 1, "position": 1, "recorded_at": 1_699_920_000_001}], "whole UTC day"),
])
def test_anchors_schema_refuses_bad_batches(entries, message):
    with pytest.raises(SchemaError, match=message):
        anchors("A", *entries)


def test_anchors_schema_refuses_extra_fields_in_an_anchor():
    tx = anchors("A", (1, 1))
    body = dict(tx.body, anchors=[dict(tx.body["anchors"][0], name="Jane Doe")])
    with pytest.raises(SchemaError, match="unexpected fields"):
        Transaction.create("record.anchors", body, chain_id="chain", submitter="A", identity=KEYS["A"], time_ms=1)


@pytest.mark.parametrize("actor", [b"", b"u" * 15])
@pytest.mark.parametrize("body", [{"text": ""}, {"text": "x" * 300}, {"text": "病" * 40}])
def test_the_signed_bytes_cut_from_the_encoding_are_the_signing_bytes(actor, body):
    identity = crypto.Identity.generate()
    tx = Transaction.create("note", body, chain_id="chain-x", submitter="Hospital-B", identity=identity,
                            time_ms=2**40, actor=actor)
    decoded = Transaction.decode(tx.encoded)
    assert decoded.signed_bytes() == crypto.signing_bytes("ehrnode/tx/v1", decoded._unsigned())
    decoded.check_signature(identity.public_key)
    with pytest.raises(Exception, match="bad signature"):
        decoded.check_signature(crypto.Identity.generate().public_key)


def test_a_ledger_state_keeps_the_rules_it_was_applied_under(tmp_path):
    path = tmp_path / "n.db"
    LedgerState(path, "chain", MEMBERS, roles=ROLES, keys=EPOCHS, rules=2).close()
    LedgerState(path, "chain", MEMBERS, roles=ROLES, keys=EPOCHS, rules=2).close()  # same rules: fine
    with pytest.raises(StoreError, match="applied under ledger rules 2, but genesis names rules 1"):
        LedgerState(path, "chain", MEMBERS, roles=ROLES, keys=EPOCHS, rules=1)
    # A state applied before rules were recorded was applied under rules 1.
    old = tmp_path / "old.db"
    state = LedgerState(old, "chain", MEMBERS, roles=ROLES, keys=EPOCHS, rules=1)
    state.chain_id = "chain"
    state.apply(block(1, anchor("A")))
    state._db.execute("DROP TABLE rules")
    state.close()
    with pytest.raises(StoreError, match="applied under ledger rules 1"):
        LedgerState(old, "chain", MEMBERS, roles=ROLES, keys=EPOCHS, rules=2)
    LedgerState(old, "chain", MEMBERS, roles=ROLES, keys=EPOCHS, rules=1).close()
