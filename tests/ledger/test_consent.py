"""Consent on chain: who may record it, and the decision grants and revocations add up to."""

import pytest

from ehrnode import synthetic
from ehrnode.errors import SchemaError
from ehrnode.ledger.empi_registry import scoped_enrolment as scoped

from .test_empi_registry import Chain, enrol, tx


def consent(action, empi, grantee="*", purposes=("*",), scope=("*",), until=0, submitter="A"):
    return tx(f"consent.{action}", {"epoch": 0, "empi": empi, "grantee": grantee, "purposes": list(purposes),
                                    "scope": list(scope), "until": until}, submitter)


def anchor(n, patient, institution):
    return tx("record.anchor", {
        "epoch": 0, "record": bytes([n]) * 16, "patient": patient, "institution": institution,
        "recorded_at": 86_400_000,
        "setting": "AMB", "resource_type": "Condition", "commitment": bytes([n]) * 32, "position": n,
        "entry": bytes(32)}, institution)


@pytest.fixture
def chain(tmp_path):
    """A holds patient p (enrolled, one record anchored), B holds patient q."""
    c = Chain(tmp_path / "state.db")
    people = synthetic.people(2, seed=4)
    c.apply(enrol(synthetic.patient_resources(people[0], "A")[0], "A", b"p" * 16),
            enrol(synthetic.patient_resources(people[1], "B")[0], "B", b"q" * 16))
    assert c.apply(anchor(1, b"p" * 16, "A"), anchor(2, b"q" * 16, "B")) == ["ok", "ok"]
    return c


def test_grants_and_revocations_decide_in_chain_order(chain):
    registry = chain.state.empi
    empi = registry.empi_of(scoped("A", b"p" * 16))
    def decide(*args, **kwargs):
        return chain.state.consent.decide(*args, holder="A", **kwargs)
    assert decide(empi, "B", "treatment", "Condition", 10, default=False).reason == "default"
    assert chain.apply(consent("grant", empi, "B", ["treatment"], ["Condition", "Observation"])) == ["ok"]
    d = decide(empi, "B", "treatment", "Condition", 10, default=False)
    assert d.allowed and d.reason == "granted" and d.tx_id is not None
    assert not decide(empi, "B", "research", "Condition", 10, default=False).allowed  # another purpose
    assert not decide(empi, "B", "treatment", "Encounter", 10, default=False).allowed  # another type
    assert not decide(empi, "C", "treatment", "Condition", 10, default=False).allowed  # another grantee
    # A later revocation for everyone wins over the earlier grant; a later grant wins again.
    assert chain.apply(consent("revoke", empi)) == ["ok"]
    assert decide(empi, "B", "treatment", "Condition", 10, default=True).reason == "revoked"
    assert chain.apply(consent("grant", empi, "B", ["treatment"], ["*"], until=1000)) == ["ok"]
    assert decide(empi, "B", "treatment", "Encounter", 999, default=False).allowed
    # Once it has ended, the grant no longer counts: the revocation before it decides.
    assert decide(empi, "B", "treatment", "Encounter", 1000, default=False).reason == "revoked"
    assert [e["action"] for e in chain.state.consent.entries(empi)] == ["grant", "revoke", "grant"]


def test_only_a_holder_of_the_patients_records_records_consent(chain, tmp_path):
    registry = chain.state.empi
    ea = registry.empi_of(scoped("A", b"p" * 16))
    assert chain.apply(consent("grant", ea, submitter="B"), consent("grant", ea, grantee="Nobody"),
                       consent("grant", "E" + "A" * 24)) == [
        "invalid:not_holder", "invalid:unknown_grantee", "invalid:unknown"]
    # An enrolment without any anchored record is not enough either.
    people = synthetic.people(3, seed=4)
    assert chain.apply(enrol(synthetic.patient_resources(people[2], "B")[0], "B", b"r" * 16)) == ["ok"]
    er = registry.empi_of(scoped("B", b"r" * 16))
    assert chain.apply(consent("grant", er, submitter="B")) == ["invalid:not_holder"]


def test_consent_override_by_another_member_fails(chain):
    """The attack: A revokes for everyone; B joins its own dummy patient to the EMPI and grants."""
    registry = chain.state.empi
    ea, q = registry.empi_of(scoped("A", b"p" * 16)), scoped("B", b"q" * 16)
    assert chain.apply(consent("revoke", ea)) == ["ok"]
    link = tx("empi.link", {"enrolment": q, "empi": ea}, "B")
    assert chain.apply(link) == ["ok"]
    assert registry.empi_of(q) != ea  # held: A has not agreed
    assert chain.apply(consent("grant", ea, "B", submitter="B")) == ["invalid:not_holder"]
    assert chain.state.consent.decide(ea, "B", "treatment", "Condition", 5, holder="A", default=True).reason == \
        "revoked"
    # Even once A agrees and B holds records under the EMPI, B's grant opens only B's records,
    # and A's revocation stands for A's.
    assert chain.apply(tx("empi.accept", {"request": link.id}, "A")) == ["ok"]
    assert chain.apply(consent("grant", ea, "B", submitter="B")) == ["ok"]
    decide = chain.state.consent.decide
    assert decide(ea, "B", "treatment", "Condition", 5, holder="A", default=True).reason == "revoked"
    # And a revocation by any holder is not undone by another holder's grant.
    assert chain.apply(consent("grant", ea), consent("revoke", ea, submitter="B")) == ["ok", "ok"]
    assert decide(ea, "C", "treatment", "Condition", 5, holder="A", default=True).reason == "revoked"
    assert chain.apply(consent("grant", ea, submitter="B")) == ["ok"]
    assert decide(ea, "C", "treatment", "Condition", 5, holder="A", default=False).reason == "granted"


def test_a_grant_covers_only_its_holders_records_and_consent_follows_agreed_merges(chain):
    registry = chain.state.empi
    ea, eb = registry.empi_of(scoped("A", b"p" * 16)), registry.empi_of(scoped("B", b"q" * 16))
    # B's research opt-in for its patient covers B's records; after an agreed merge, A's
    # records of the merged patient still follow A's own consent (here: the default).
    assert chain.apply(consent("grant", eb, "A", ["research"], submitter="B")) == ["ok"]
    merge = tx("empi.merge", {"from": eb, "into": ea}, "B")
    assert chain.apply(merge) == ["ok"]
    assert registry.resolve(None, eb) == eb  # held until A agrees
    assert chain.apply(tx("empi.accept", {"request": merge.id}, "A")) == ["ok"]
    assert registry.resolve(None, eb) == ea
    decide = chain.state.consent.decide
    assert decide(ea, "A", "research", "Condition", 1, holder="B", default=False).allowed
    assert not decide(ea, "C", "research", "Condition", 1, holder="A", default=False).allowed
    assert chain.apply(consent("revoke", ea, submitter="B")) == ["ok"]  # B holds records under ea


@pytest.mark.parametrize("field,value", [
    ("purposes", ["shopping"]), ("purposes", []), ("purposes", ["treatment", "treatment"]), ("purposes", [{}]),
    ("scope", ["not a type"]), ("scope", [[1]]), ("grantee", ""), ("empi", "Bob"), ("until", -1),
])
def test_consent_schema_refuses_malformed_bodies(field, value):
    body = {"epoch": 0, "empi": "E" + "A" * 24, "grantee": "*", "purposes": ["*"], "scope": ["*"], "until": 0}
    with pytest.raises(SchemaError):
        tx("consent.grant", dict(body, **{field: value}))
