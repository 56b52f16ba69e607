"""The recorder in-process: all-or-nothing input, patients and EMPIs, settings, k-anonymity."""

import json

import pytest

from ehrnode import crypto, synthetic
from ehrnode.empi.assign import assign_empi
from ehrnode.errors import FhirError
from ehrnode.records import fhir
from ehrnode.records.deid import Deidentifier, load_profile
from ehrnode.records.kanon import kanon_report
from ehrnode.records.keys import RecordKeys
from ehrnode.records.recorder import Recorder
from ehrnode.records.vault import Vault

CONSORTIUM = b"c" * 32
IDENTITY = crypto.Identity.from_seed(b"r" * 32)


def recorder(tmp_path, name="A", profile=None):
    keys = RecordKeys.derive(name.encode() * 32, CONSORTIUM)
    vault = Vault(tmp_path / f"{name}.sqlite3", keys, IDENTITY)
    return Recorder(vault=vault, keys=keys, deidentifier=Deidentifier(profile or load_profile(), keys.deid),
                    institution=name, chain_id="chain", identity=IDENTITY)


def items(resources, name="input.ndjson"):
    got, problems = fhir.read_bytes("".join(json.dumps(r) + "\n" for r in resources).encode(), name)
    assert not problems
    return got


PEOPLE = synthetic.people(12, seed=3)


def test_an_input_with_an_absent_patient_records_nothing(tmp_path):
    rec = recorder(tmp_path)
    resources = synthetic.patient_resources(PEOPLE[0], "A")
    orphan = synthetic.patient_resources(PEOPLE[1], "A")[1:]  # visits without their Patient
    with pytest.raises(FhirError, match="neither in this input nor recorded here") as err:
        rec.record(items(resources + orphan), now_ms=1)
    assert "input.ndjson:8" in str(err.value)
    assert rec.vault.count() == 0 and rec.vault.outbox() == []


def test_skip_invalid_drops_a_bad_patient_with_everything_that_belongs_to_it(tmp_path):
    rec = recorder(tmp_path)
    good = synthetic.patient_resources(PEOPLE[0], "A", visits=1)
    bad = synthetic.patient_resources(PEOPLE[1], "A", visits=1)
    bad[0] = dict(bad[0], gender=7)  # not a code: the Patient is invalid
    outcome = rec.record(items(good + bad), skip_invalid=True, now_ms=1)
    assert [r.resource_type for r in outcome.records] == ["Patient", "Encounter", "Condition", "Observation"]
    assert len(outcome.skipped) == 4
    assert all(s["source"].startswith("input.ndjson:") for s in outcome.skipped)
    assert rec.vault.verify(IDENTITY.public_key)["ok"]


def test_later_records_inherit_their_encounters_setting_and_the_patient(tmp_path):
    rec = recorder(tmp_path)
    resources = synthetic.patient_resources(PEOPLE[0], "A", visits=1)
    first = rec.record(items(resources[:2]), now_ms=1)  # Patient and Encounter
    second = rec.record(items(resources[2:]), now_ms=2)  # Condition and Observation, later
    encounter_class = resources[1]["class"]["code"]
    assert [a.body["setting"] for a in first.anchors] == ["unknown", encounter_class]
    assert [a.body["setting"] for a in second.anchors] == [encounter_class, encounter_class]
    assert {r.empi for r in first.records + second.records} == {first.records[0].empi}
    assert [a.body["position"] for a in first.anchors + second.anchors] == [1, 2, 3, 4]


def test_the_same_person_gets_the_same_empi_at_two_institutions_and_only_with_a_national_id():
    for person in PEOPLE[:6]:
        at_a = synthetic.patient_resources(person, "A")[0]
        at_b = synthetic.patient_resources(person, "B")[0]
        assert at_a["id"] != at_b["id"]
        assert assign_empi(at_a, key=CONSORTIUM, institution="A") == assign_empi(at_b, key=CONSORTIUM,
                                                                                  institution="B")
        anonymous_a = dict(at_a, identifier=at_a["identifier"][:1])  # the MRN only
        anonymous_b = dict(at_b, identifier=at_b["identifier"][:1])
        assert assign_empi(anonymous_a, key=CONSORTIUM, institution="A") != assign_empi(
            anonymous_b, key=CONSORTIUM, institution="B")
    # A different consortium key gives unrelated EMPIs.
    patient = synthetic.patient_resources(PEOPLE[0], "A")[0]
    assert assign_empi(patient, key=b"x" * 32, institution="A") != assign_empi(patient, key=CONSORTIUM,
                                                                                institution="A")


def test_a_mistyped_resident_id_is_not_trusted_as_national(tmp_path):
    person = next(p for p in PEOPLE if p.country == "CN")
    patient = synthetic.patient_resources(person, "A")[0]
    wrong = person.national_id[:-1] + ("0" if person.national_id[-1] != "0" else "1")
    typo = json.loads(json.dumps(patient).replace(person.national_id, wrong))
    assert assign_empi(typo, key=CONSORTIUM, institution="A") != assign_empi(patient, key=CONSORTIUM,
                                                                              institution="A")


def test_k_anonymity_holds_over_everything_released_across_ingests(tmp_path):
    profile_path = tmp_path / "k3.toml"
    profile_path.write_text('[profile]\nname = "k3"\nextends = "default"\n\n[kanonymity]\nk = 3\n')
    rec = recorder(tmp_path, profile=load_profile(profile_path))
    population = synthetic.people(40, seed=11)
    for batch in (population[:25], population[25:]):
        resources = [synthetic.patient_resources(p, "A", visits=1)[0] for p in batch]
        rec.record(items(resources), now_ms=1)
    released = [row.released for row in rec.vault.patients()]
    report = kanon_report(released, 3)
    assert report["patients"] == 40
    assert report["k_reached"] >= 3 or report["classes"] == 0
    assert report["below_k"] == 0 and report["classes"] >= 2
