"""The access log on chain: who may log, grant, erase and raise alarms, identically on every node."""

import dataclasses
import os

import pytest

from ehrnode import crypto, synthetic
from ehrnode.consensus.types import Block
from ehrnode.errors import CodecError, SchemaError
from ehrnode.ledger.mempool import Mempool
from ehrnode.ledger.requests import PullRequest

from .sealing import sealed
from .test_empi_registry import EPOCHS, KEYS, MEMBERS, Chain, F, enrol, tx


def anchor(record, position, submitter="A", patient=b"p" * 16):
    return tx("record.anchor", {
        "epoch": 0, "record": record, "patient": patient, "institution": submitter, "recorded_at": 86_400_000,
        "setting": "AMB", "resource_type": "Condition", "commitment": os.urandom(32), "position": position,
        "entry": os.urandom(32)}, submitter)


def signed(record, requester="B", owner="A", chain=None, identity=None, time_ms=1):
    return PullRequest.create(chain_id=chain or F.vset.chain_id, requester=requester, user=b"u" * 15,
                              role="clinician", owner=owner, record=record, purpose="treatment", time_ms=time_ms,
                              identity=identity or KEYS.get(requester) or crypto.Identity.generate()).encode()


def access(record, decision="granted", reason="granted", requester="B", submitter="A", request=None):
    return tx("access.log", {
        "epoch": 0, "request": request or signed(record, requester, owner=submitter), "decision": decision,
        "reason": reason, "consent": b""}, submitter)


@pytest.fixture
def chain(tmp_path):
    c = Chain(tmp_path / "state.db")
    person = synthetic.people(1, seed=5)[0]
    c.apply(enrol(synthetic.patient_resources(person, "A")[0], "A", b"p" * 16))
    return c


def test_only_the_owner_grants_each_request_once_and_never_after_erasure(chain):
    record = b"r" * 16
    assert chain.apply(anchor(record, 1)) == ["ok"]
    request = signed(record)
    granted = access(record, request=request)
    assert chain.apply(granted) == ["ok"]
    assert chain.apply(access(record, request=request)) == ["invalid:duplicate_request"]
    # Another institution cannot grant access to A's record, the regulator cannot log at all,
    # and the requester must be a member.
    assert chain.apply(access(record, submitter="B", requester="A"), access(record, submitter="R"),
                       access(record, requester="Mallory")) == [
        "invalid:not_owner", "invalid:role", "invalid:unknown_requester"]
    # The request must be the requester's, addressed to the submitter, for this chain.
    assert chain.apply(access(record, request=signed(record, identity=crypto.Identity.generate())),
                       access(record, request=signed(record, owner="B")),
                       access(record, request=signed(record, chain="another-chain"))) == [
        "invalid:bad_request_signature", "invalid:not_addressed", "invalid:wrong_chain"]
    # Nor can an owner log, hours later, a request it did not decide when it came.
    assert chain.apply(access(record, request=signed(record, time_ms=3 * 3600 * 1000))) == [
        "invalid:stale_request"]
    # A refusal may name a record nobody anchored (the request was signed for it).
    assert chain.apply(access(os.urandom(16), "refused", "not_found")) == ["ok"]
    assert chain.apply(tx("record.erase", {"epoch": 0, "record": record, "reason": b"x" * 32}, "B")) == [
        "invalid:not_owner"]
    assert chain.apply(tx("record.erase", {"epoch": 0, "record": b"u" * 16, "reason": b"x" * 32})) == [
        "invalid:unknown_record"]
    erase = tx("record.erase", {"epoch": 0, "record": record, "reason": b"x" * 32})
    assert chain.apply(erase) == ["ok"]
    assert chain.apply(tx("record.erase", {"epoch": 0, "record": record, "reason": b"y" * 32})) == [
        "invalid:already_erased"]
    assert chain.apply(access(record)) == ["invalid:erased"]
    assert chain.apply(access(record, "refused", "erased")) == ["ok"]
    log = chain.state.access
    assert [(a["decision"], a["reason"]) for a in log.accesses(records=[record])] == [
        ("granted", "granted"), ("refused", "erased")]
    assert log.erasure(record)["tx_id"] == erase.id


def test_only_the_served_requester_raises_one_alarm_per_access(chain):
    record = b"s" * 16
    chain.apply(anchor(record, 1))
    granted = access(record)
    refused = access(record, "refused", "consent")
    chain.apply(granted, refused)

    def alert(access_tx, submitter="B", owner="A", rec=record):
        return tx("integrity.alert", {"epoch": 0, "record": rec, "owner": owner, "access": access_tx.id,
                                      "received": b"z" * 32}, submitter)

    assert chain.apply(alert(granted, submitter="R"), alert(refused), alert(granted, owner="B"),
                       alert(granted, rec=b"t" * 16)) == [
        "invalid:not_requester", "invalid:unknown_access", "invalid:mismatch", "invalid:mismatch"]
    assert chain.apply(alert(granted)) == ["ok"]
    assert chain.apply(alert(granted)) == ["invalid:duplicate_alert"]
    assert [(a["reporter"], a["owner"]) for a in chain.state.access.alerts(records=[record])] == [("B", "A")]


def accesses(*decisions, submitter="A"):
    """An ``access.logs`` of ``(record, decision, reason[, requester])`` decisions."""
    body = []
    for record, decision, reason, *requester in decisions:
        body.append({"request": signed(record, *requester, owner=submitter), "decision": decision, "reason": reason,
                     "consent": b""})
    return tx("access.logs", {"epoch": 0, "decisions": body}, submitter)


def test_a_batch_of_decisions_is_applied_whole_or_not_at_all(chain):
    mine, erased = b"1" * 16, b"2" * 16
    chain.apply(anchor(mine, 1), anchor(erased, 2))
    chain.apply(tx("record.erase", {"epoch": 0, "record": erased, "reason": b"x" * 32}))
    good = accesses((mine, "granted", "granted"), (mine, "refused", "consent"), (b"3" * 16, "refused", "not_found"))
    bad = accesses((mine, "granted", "granted"), (erased, "granted", "granted"))  # the second one cannot be
    strangers = accesses((mine, "granted", "granted"), (mine, "granted", "granted", "Mallory"))
    assert chain.apply(good, bad, strangers, accesses((mine, "granted", "granted"), submitter="R")) == [
        "ok", "invalid:erased", "invalid:unknown_requester", "invalid:role"]
    log = chain.state.access
    assert [a["tx_id"] for a in log.accesses(records=[mine, erased])] == [good.id, good.id]
    assert log.accesses(request=crypto.sha256(bad.body["decisions"][0]["request"])) == []
    # Decided alone later, the good half of the refused batch is logged.
    alone = tx("access.logs", {"epoch": 0, "decisions": bad.body["decisions"][:1]})
    assert chain.apply(alone) == ["ok"]
    # A request decided in one batch cannot be decided again in another.
    assert chain.apply(tx("access.logs", {"epoch": 0, "decisions": good.body["decisions"][1:2]})) == [
        "invalid:duplicate_request"]


def test_an_alarm_names_a_batched_access_by_its_request_once(chain):
    record = b"s" * 16
    chain.apply(anchor(record, 1))
    batch = accesses((record, "granted", "granted"), (record, "granted", "granted"))
    single = access(record)
    chain.apply(batch, single)
    first, second = (crypto.sha256(d["request"]) for d in batch.body["decisions"])

    def alert(access_id):
        return tx("integrity.alert", {"epoch": 0, "record": record, "owner": "A", "access": access_id,
                                      "received": b"z" * 32}, "B")

    # The batch's id names two accesses: not which one.
    assert chain.apply(alert(batch.id)) == ["invalid:unknown_access"]
    assert chain.apply(alert(first), alert(second), alert(first)) == ["ok", "ok", "invalid:duplicate_alert"]
    # An access logged alone can be named either way, but raised only once.
    assert chain.apply(alert(single.id), alert(crypto.sha256(single.body["request"]))) == [
        "ok", "invalid:duplicate_alert"]
    assert [a["access"] for a in chain.state.access.alerts(records=[record])] == [first, second, single.id]
    assert chain.state.access.named(second)["tx_id"] == batch.id
    assert chain.state.access.named(batch.id) is None


def test_access_log_state_from_before_batches_is_rebuilt_in_order(tmp_path):
    import sqlite3

    from ehrnode.ledger.access import ACCESS_COLUMNS, AccessLog
    db = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    db.execute("CREATE TABLE accesses (request BLOB PRIMARY KEY, signed BLOB NOT NULL, record BLOB NOT NULL, "
               "owner TEXT NOT NULL, requester TEXT NOT NULL, purpose TEXT NOT NULL, decision TEXT NOT NULL, "
               "reason TEXT NOT NULL, consent BLOB NOT NULL, requested_at INTEGER NOT NULL, time INTEGER NOT NULL, "
               "height INTEGER NOT NULL, tx_id BLOB NOT NULL UNIQUE)")  # from before users, too
    for n in (3, 1, 2):
        db.execute("INSERT INTO accesses VALUES (?, x'00', x'01', 'A', 'B', 'treatment', 'granted', 'granted', x'', "
                   "1, 1, 5, ?)", (bytes([n]) * 32, bytes([n + 10]) * 32))
    log = AccessLog(db, "chain", {})
    rows = log.accesses()
    assert [r["request"] for r in rows] == [bytes([n]) * 32 for n in (3, 1, 2)]
    assert all(r["user"] == b"" and r["user_role"] == "" for r in rows)
    assert set(ACCESS_COLUMNS) <= set(rows[0])
    assert "UNIQUE" not in db.execute("SELECT sql FROM sqlite_master WHERE name = 'accesses'").fetchone()[0]
    columns = ", ".join(ACCESS_COLUMNS)
    # Another access of the same transaction: allowed now.
    db.execute(f"INSERT INTO accesses (request, signed, {columns}) SELECT x'09', signed, {columns} FROM accesses "
               "LIMIT 1")
    AccessLog(db, "chain", {})  # opened again: nothing left to rebuild
    assert len(log.accesses()) == 4


@pytest.mark.parametrize("decisions,message", [
    ([], "at least one decision"),
    ([{"decision": "maybe"}], "granted or refused"),
    ([{}, {"reason": "policy"}], r"decisions\[1\].reason: does not fit"),
    ([{}, {"request": "same"}], "decided twice"),
    ([{}] * 33, "exceeds 32"),
])
def test_access_logs_schema_refuses_bad_batches(decisions, message):
    request = signed(b"r" * 16)
    body = []
    for i, change in enumerate(decisions):
        fields = {"request": signed(bytes([i]) * 16), "decision": "granted", "reason": "granted", "consent": b""}
        body.append(dict(fields, **{k: (request if v == "same" else v) for k, v in change.items()}))
    if decisions and decisions[-1].get("request") == "same":
        body[0]["request"] = request
    with pytest.raises(CodecError, match=message):
        tx("access.logs", {"epoch": 0, "decisions": body})


@pytest.mark.parametrize("field,value", [
    ("decision", "maybe"), ("reason", "because"), ("consent", b"x" * 5), ("request", b"short"),
    ("request", signed(b"r" * 16)[:-1]),
])
def test_access_schema_refuses_malformed_bodies(field, value):
    body = {"epoch": 0, "request": signed(b"r" * 16), "decision": "granted", "reason": "granted", "consent": b""}
    with pytest.raises(CodecError):
        tx("access.log", dict(body, **{field: value}))


def test_a_request_decoded_again_is_the_same_and_a_tampered_one_still_fails_its_signature():
    key = crypto.Identity.generate()
    data = signed(b"r" * 16, identity=key)
    request = PullRequest.decode(data)
    assert PullRequest.decode(bytes(bytearray(data))) is request and request.signature_ok(key.public_key)
    other = PullRequest.decode(signed(b"s" * 16, identity=key))
    assert other is not request and other.record == b"s" * 16
    forged = dataclasses.replace(request, record=b"s" * 16)  # another record under the first's signature
    assert forged.signature_ok(key.public_key) is False
    assert PullRequest.decode(forged.encode()).signature_ok(key.public_key) is False
    with pytest.raises(CodecError):
        PullRequest.decode(data[:-1])


def test_a_decision_and_its_reason_must_agree():
    body = {"epoch": 0, "request": signed(b"r" * 16), "consent": b""}
    for decision, reason in (("granted", "consent"), ("refused", "granted"), ("refused", "emergency_override")):
        with pytest.raises(SchemaError):
            tx("access.log", dict(body, decision=decision, reason=reason))


def test_transactions_the_mempool_checked_apply_exactly_as_decoded_ones(tmp_path):
    record = b"m" * 16
    person = synthetic.people(1, seed=5)[0]
    txs = [enrol(synthetic.patient_resources(person, "A")[0], "A", b"p" * 16), anchor(record, 1),
           access(record), access(record, request=signed(record, identity=crypto.Identity.generate()))]
    plain, fast = Chain(tmp_path / "plain.db"), Chain(tmp_path / "fast.db")
    pool = Mempool(F.vset.chain_id, MEMBERS, opener=fast.state.open_envelope)
    envelopes = [sealed(t, EPOCHS) for t in txs]
    for data in envelopes:
        pool.admit(data)
    assert plain.apply(*txs) == ["ok", "ok", "ok", "invalid:bad_request_signature"]
    block = Block.propose(epoch=0, round=1, qc=F.genesis_qc, author=1, timestamp=0,
                          payload=tuple(envelopes), identity=F.identities[1], chain_id=F.vset.chain_id)
    fast.state.apply(dataclasses.replace(block, height=1), pool)
    assert [fast.state.tx_status(t.id) for t in txs] == [plain.state.tx_status(t.id) for t in txs]
    # Own transactions (never decoded from the wire) are not taken on trust.
    own = Mempool(F.vset.chain_id, MEMBERS, opener=fast.state.open_envelope)
    envelope = fast.state.seal(txs[0])
    own.admit_own(txs[0], envelope)
    assert own.get(envelope.id) is None and pool.get(crypto.sha256(envelopes[0])) == txs[0]
    assert txs[0].id in own and txs[0].id in pool


def test_a_chain_of_rules_1_applies_batches_and_alerts_by_request_as_it_always_did(tmp_path):
    # What nodes from before batching recorded for these, a node of today records on such a chain,
    # even re-applying its blocks later: kinds it did not know are malformed, and an alert naming
    # an access by its request names nothing.
    chain = Chain(tmp_path / "rules1.db", rules=1)
    person = synthetic.people(1, seed=5)[0]
    chain.apply(enrol(synthetic.patient_resources(person, "A")[0], "A", b"p" * 16))
    record = b"r" * 16
    batch = tx("record.anchors", {"epoch": 0, "institution": "A", "anchors": [
        {k: v for k, v in anchor(b"b" * 16, 2).body.items() if k not in ("epoch", "institution")}]})
    single = access(record)
    chain.apply(anchor(record, 1), batch, accesses((record, "granted", "granted")), single)
    # (Unreadable, they are known by their envelopes' ids, as they were.)
    assert [status for _, status in chain.state.block_txs(chain.height)] == [
        "ok", "invalid:malformed", "invalid:malformed", "ok"]
    assert [a["record"] for a in chain.state.anchors()] == [record]

    def alert(access_id):
        return tx("integrity.alert", {"epoch": 0, "record": record, "owner": "A", "access": access_id,
                                      "received": b"z" * 32}, "B")

    assert chain.apply(alert(crypto.sha256(single.body["request"])), alert(single.id)) == [
        "invalid:unknown_access", "ok"]


def test_audit_event_ids_are_unique_and_those_of_single_transactions_unchanged(chain):
    from ehrnode.sharing.audit import audit_bundle, trail

    single, both = b"1" * 16, (b"2" * 16, b"3" * 16)
    one = anchor(single, 1)
    two = tx("record.anchors", {"epoch": 0, "institution": "A", "anchors": [
        {k: v for k, v in anchor(r, p).body.items() if k not in ("epoch", "institution")}
        for r, p in zip(both, (2, 3), strict=True)]})
    alone = access(single)
    batch = accesses((both[0], "granted", "granted"), (both[1], "granted", "granted"))
    assert chain.apply(one, two, alone, batch) == ["ok"] * 4
    events = [e for r in (single, *both) for e in trail(chain.state, record=r)]

    def record_of(resource):
        return next(x["what"]["identifier"]["value"] for x in resource["entity"]
                    if x["what"]["identifier"]["system"] == "urn:ehrnode:record")

    ids = {(e["resource"]["action"], record_of(e["resource"])): e["resource"]["id"]
           for e in audit_bundle(events, "A")["entry"]}
    assert ids[("C", single.hex())] == one.id.hex() and ids[("R", single.hex())] == alone.id.hex()
    assert {ids[("C", r.hex())] for r in both} == {two.id.hex()[:32] + r.hex() for r in both}
    assert len(set(ids.values())) == 6
    assert all(len(i) == 64 for i in ids.values())
