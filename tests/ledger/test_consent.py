"""Consent on chain: who may record it, and the decision grants and revocations add up to."""

import pytest

from ehrnode import synthetic
from ehrnode.errors import SchemaError
from ehrnode.ledger.empi_registry import scoped_enrolment as scoped

from .test_empi_registry import Chain, enrol, tx


def consent(action, empi, grantee="*", purposes=("*",), scope=("*",), until=0, submitter="A"):
    return tx(f"consent.{action}", {"epoch": 0, "empi": empi, "grantee": grantee, "purposes": list(purposes),
                                    "scope": list(scope), "until": until}, submitter)


@pytest.fixture
def chain(tmp_path):
    c = Chain(tmp_path / "state.db")
    people = synthetic.people(2, seed=4)
    c.apply(enrol(synthetic.patient_resources(people[0], "A")[0], "A", b"p" * 16),
            enrol(synthetic.patient_resources(people[1], "B")[0], "B", b"q" * 16))
    return c


def test_grants_and_revocations_decide_in_chain_order(chain):
    registry = chain.state.empi
    empi = registry.empi_of(scoped("A", b"p" * 16))
    decide = chain.state.consent.decide
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


def test_only_the_patients_institutions_record_consent_and_it_follows_merges(chain):
    registry = chain.state.empi
    ea, eb = registry.empi_of(scoped("A", b"p" * 16)), registry.empi_of(scoped("B", b"q" * 16))
    assert chain.apply(consent("grant", ea, submitter="B"), consent("grant", ea, grantee="Nobody"),
                       consent("grant", "E" + "A" * 24)) == [
        "invalid:not_owner", "invalid:unknown_grantee", "invalid:unknown"]
    assert chain.apply(consent("grant", eb, "A", ["research"], submitter="B")) == ["ok"]
    assert chain.apply(tx("empi.merge", {"from": eb, "into": ea})) == ["ok"]
    # B's patient is now under ea, and the consent recorded under eb still counts.
    assert chain.state.consent.decide(ea, "A", "research", "Condition", 1, default=False).allowed
    assert chain.apply(consent("revoke", ea, submitter="B")) == ["ok"]  # B has a patient in ea now


@pytest.mark.parametrize("field,value", [
    ("purposes", ["shopping"]), ("purposes", []), ("purposes", ["treatment", "treatment"]), ("purposes", [{}]),
    ("scope", ["not a type"]), ("scope", [[1]]), ("grantee", ""), ("empi", "Bob"), ("until", -1),
])
def test_consent_schema_refuses_malformed_bodies(field, value):
    body = {"epoch": 0, "empi": "E" + "A" * 24, "grantee": "*", "purposes": ["*"], "scope": ["*"], "until": 0}
    with pytest.raises(SchemaError):
        tx("consent.grant", dict(body, **{field: value}))
