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


@pytest.mark.parametrize("field,value", [
    ("decision", "maybe"), ("reason", "because"), ("consent", b"x" * 5), ("request", b"short"),
    ("request", signed(b"r" * 16)[:-1]),
])
def test_access_schema_refuses_malformed_bodies(field, value):
    body = {"epoch": 0, "request": signed(b"r" * 16), "decision": "granted", "reason": "granted", "consent": b""}
    with pytest.raises(CodecError):
        tx("access.log", dict(body, **{field: value}))


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
