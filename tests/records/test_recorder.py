"""The recorder in-process: all-or-nothing input, patients and EMPIs, settings, k-anonymity."""

import json

import pytest

from ehrnode import crypto, synthetic
from ehrnode.config import LEDGER_RULES
from ehrnode.empi.encoding import Encoder
from ehrnode.errors import DeidentificationError, FhirError
from ehrnode.ledger.transactions import anchors_of
from ehrnode.records import fhir
from ehrnode.records.canonical import canonical_json, commitment
from ehrnode.records.deid import Deidentifier, load_profile
from ehrnode.records.kanon import kanon_report
from ehrnode.records.keys import RecordKeys
from ehrnode.records.recorder import Recorder
from ehrnode.records.vault import Vault
from ehrnode.records.workers import POOL_THRESHOLD, Preparer

CONSORTIUM = b"c" * 32
IDENTITY = crypto.Identity.from_seed(b"r" * 32)
MEMBER = crypto.MemberKeys(IDENTITY, crypto.SealingKey.generate())


def recorder(tmp_path, name="A", profile=None, rules=LEDGER_RULES):
    keys = RecordKeys.derive(name.encode() * 32, CONSORTIUM)
    vault = Vault(tmp_path / f"{name}.sqlite3", keys, MEMBER)
    # The consortium's OPRF evaluated in-process, under a key of the test's own.
    return Recorder(vault=vault, keys=keys, deidentifier=Deidentifier(profile or load_profile(), keys.deid),
                    institution=name, chain_id="chain", member=MEMBER, encoder=Encoder(CONSORTIUM, oprf_key=0x5EED),
                    rules=rules)


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


def test_entries_sealed_while_the_input_is_released_are_the_ones_written(tmp_path):
    rec = recorder(tmp_path)
    rec.record(items(synthetic.patient_resources(PEOPLE[2], "A", visits=1)), now_ms=1)
    prepared = rec.prepare(items(synthetic.patient_resources(PEOPLE[3], "A", visits=2)), now_ms=2)
    assert len(prepared.sealed) == len(prepared.candidates) == 7
    assert [s.stored.header.position for s in prepared.sealed] == list(range(5, 12))  # after the first input
    outcome = rec.write(prepared)
    assert [rec.vault.entry(bytes.fromhex(r.record_id)).hash for r in outcome.records] == \
        [s.stored.hash for s in prepared.sealed]
    assert rec.vault.verify(IDENTITY.public_key)["ok"]


def test_entries_encrypted_in_the_worker_processes_are_stored_as_made_and_read_back(tmp_path):
    """A large input goes through the worker processes, which encrypt each entry (the node links,
    signs and wraps its keys): the vault keeps exactly what they made, verifies, and each record
    reads back as it came in, its release under the commitment on its anchor."""
    keys = RecordKeys.derive(b"W" * 32, CONSORTIUM)
    deid = Deidentifier(load_profile(), keys.deid)
    preparer = Preparer(deid, None, keys.deid, workers=2)
    rec = Recorder(vault=Vault(tmp_path / "W.sqlite3", keys, MEMBER), keys=keys, deidentifier=deid, institution="W",
                   chain_id="chain", member=MEMBER, encoder=Encoder(CONSORTIUM, oprf_key=0x5EED), preparer=preparer)
    try:
        resources = [r for p in synthetic.people(60, seed=8) for r in synthetic.patient_resources(p, "W", visits=3)]
        assert len(resources) >= POOL_THRESHOLD
        given = items(resources)
        prepared = rec.prepare(given, now_ms=1)
        assert preparer._pool is not None  # the workers made the entries
        made = {s.entry.record_id: s.entry.encrypted for s in prepared.sealed}
        assert all(e is not None for e in made.values())
        outcome = rec.write(prepared)
        assert rec.vault.verify(IDENTITY.public_key)["ok"]
        rows = dict(rec.vault._db.execute("SELECT record, raw FROM entries").fetchall())
        assert {r: made[r].raw for r in rows} == rows
        anchors = {a["record"]: a for tx in outcome.transactions for a in anchors_of(tx)}
        by_id = {(i.resource["resourceType"], i.resource["id"]): i.resource for i in given}
        for r in outcome.records[:: max(1, len(outcome.records) // 25)]:
            header, raw, released, salt = rec.vault.read(bytes.fromhex(r.record_id))
            assert raw == by_id[(raw["resourceType"], raw["id"])]
            assert commitment(salt, canonical_json(released)) == header.commitment == \
                anchors[bytes.fromhex(r.record_id)]["commitment"]
    finally:
        preparer.close()
        rec.vault.close()


def test_a_resource_left_out_in_release_has_the_rest_made_again_without_it(tmp_path, monkeypatch):
    """The Encounter cannot be released: the records after it take the next positions, and no
    setting comes from the encounter that is not recorded."""
    rec = recorder(tmp_path)
    resources = synthetic.patient_resources(PEOPLE[4], "A", visits=1)
    assert [r["resourceType"] for r in resources] == ["Patient", "Encounter", "Condition", "Observation"]
    deidentify = rec.preparer.deid.deidentify

    def failing(resource, **kwargs):
        if resource["resourceType"] == "Encounter":
            raise DeidentificationError("cannot release this one", reason="test")
        return deidentify(resource, **kwargs)

    monkeypatch.setattr(rec.preparer.deid, "deidentify", failing)
    prepared = rec.prepare(items(resources), skip_invalid=True, now_ms=1)
    assert prepared.sealed == []
    outcome = rec.write(prepared)
    assert [r.resource_type for r in outcome.records] == ["Patient", "Condition", "Observation"]
    assert [r.position for r in outcome.records] == [1, 2, 3]
    anchors = [a for tx in outcome.transactions for a in anchors_of(tx)]
    assert [a["setting"] for a in anchors] == ["unknown"] * 3
    assert rec.vault.verify(IDENTITY.public_key)["ok"]


def test_later_records_inherit_their_encounters_setting_and_the_patient(tmp_path):
    rec = recorder(tmp_path)
    resources = synthetic.patient_resources(PEOPLE[0], "A", visits=1)
    first = rec.record(items(resources[:2]), now_ms=1)  # Patient and Encounter
    second = rec.record(items(resources[2:]), now_ms=2)  # Condition and Observation, later
    encounter_class = resources[1]["class"]["code"]
    # The Patient's enrolment goes first, then the anchors of the input's records, together.
    assert [tx.kind for tx in first.transactions] == ["empi.enrol", "record.anchors"]
    assert [tx.kind for tx in second.transactions] == ["record.anchors"]
    anchors = [a for tx in first.transactions + second.transactions for a in anchors_of(tx)]
    assert [a["setting"] for a in anchors] == ["unknown", encounter_class, encounter_class, encounter_class]
    assert {r.patient for r in first.records + second.records} == {first.transactions[0].body["enrolment"].hex()}
    assert [a["position"] for a in anchors] == [1, 2, 3, 4]
    assert [a["record"].hex() for a in anchors] == [r.record_id for r in first.records + second.records]
    assert [r.tx_id for r in first.records] == [first.transactions[1].id.hex()] * 2
    assert [row[0] for row in rec.vault.outbox()] == [tx.id for tx in first.transactions + second.transactions]


def test_a_large_input_is_anchored_in_transactions_of_at_most_max_anchors(tmp_path, monkeypatch):
    monkeypatch.setattr("ehrnode.records.recorder.MAX_ANCHORS", 3)
    rec = recorder(tmp_path)
    resources = [r for person in PEOPLE[:2] for r in synthetic.patient_resources(person, "A", visits=1)]
    outcome = rec.record(items(resources), now_ms=1)
    batches = [tx for tx in outcome.transactions if tx.kind == "record.anchors"]
    assert [len(tx.body["anchors"]) for tx in batches] == [3, 3, 2]
    anchored = {a["record"].hex(): tx.id.hex() for tx in batches for a in tx.body["anchors"]}
    assert anchored == {r.record_id: r.tx_id for r in outcome.records}
    assert [a["position"] for tx in batches for a in tx.body["anchors"]] == list(range(1, 9))
    assert rec.vault.verify(IDENTITY.public_key)["ok"]


def test_items_validated_ahead_are_not_validated_again_and_their_problems_count(tmp_path, monkeypatch):
    """``checked`` covers the first items (validated while the rest of the input arrived): only the
    rest is validated now, and a problem found ahead refuses the input as one found now would."""
    rec = recorder(tmp_path)
    resources = synthetic.patient_resources(PEOPLE[5], "A", visits=1)
    given = items(resources)
    ahead = rec.check(given[:2])
    assert all(isinstance(c, bytes) for c in ahead)
    validated = []
    real = rec.preparer.validate
    monkeypatch.setattr(rec.preparer, "validate", lambda part: validated.append(len(part)) or real(part))
    outcome = rec.write(rec.prepare(given, now_ms=1, checked=ahead))
    assert validated == [len(given) - 2]
    assert len(outcome.records) == len(given)
    assert rec.vault.verify(IDENTITY.public_key)["ok"]

    again = items(synthetic.patient_resources(PEOPLE[6], "A", visits=1))
    found = fhir.Problem("input.ndjson:2", "Encounter", "e", None, "status: field required")
    with pytest.raises(FhirError, match="input.ndjson:2.*status: field required"):
        rec.prepare(again, now_ms=1, checked=[*rec.check(again[:1]), found])
    with pytest.raises(ValueError, match="more validation results than items"):
        rec.prepare(again[:1], now_ms=1, checked=rec.check(again[:2]))


def test_on_a_chain_of_rules_1_each_record_has_its_own_record_anchor(tmp_path):
    rec = recorder(tmp_path, rules=1)
    outcome = rec.record(items(synthetic.patient_resources(PEOPLE[0], "A", visits=1)), now_ms=1)
    assert [tx.kind for tx in outcome.transactions] == ["empi.enrol"] + ["record.anchor"] * 4
    assert [r.tx_id for r in outcome.records] == [tx.id.hex() for tx in outcome.transactions[1:]]
    assert [tx.body["position"] for tx in outcome.transactions[1:]] == [1, 2, 3, 4]
    assert all(tx.body["institution"] == "A" for tx in outcome.transactions[1:])


def test_enrolments_carry_keyed_encodings_and_nothing_in_clear(tmp_path):
    rec = recorder(tmp_path)
    person = PEOPLE[2]
    outcome = rec.record(items(synthetic.patient_resources(person, "A", visits=1)), now_ms=1)
    enrol = outcome.transactions[0]
    assert enrol.kind == "empi.enrol" and enrol.body["institution"] == "A"
    for value in (person.given, person.family, person.national_id, person.phone, person.birth_date,
                  person.birth_date.replace("-", ""), person.postal_code):
        assert value.encode() not in enrol.encoded, value


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


def test_released_values_are_read_from_the_patient_table_once_then_kept_as_patients_are_written(
        tmp_path, monkeypatch):
    """k-anonymity needs what every recorded Patient released: the patient table is decrypted the
    first time, not at every ingest, and what later ingests write is counted all the same."""
    profile_path = tmp_path / "k3.toml"
    profile_path.write_text('[profile]\nname = "k3"\nextends = "default"\n\n[kanonymity]\nk = 3\n')
    rec = recorder(tmp_path, profile=load_profile(profile_path))
    population = synthetic.people(30, seed=12)

    def table(vault):
        return {row.resource["id"]: tuple(row.released) for row in vault.patients()}

    rec.record(items([synthetic.patient_resources(p, "A", visits=0)[0] for p in population[:20]]), now_ms=1)
    assert rec.vault.released() == table(rec.vault) and len(table(rec.vault)) == 20
    with monkeypatch.context() as m:
        m.setattr(rec.vault, "patients", lambda: pytest.fail("the patient table was decrypted again"))
        rec.record(items([synthetic.patient_resources(p, "A", visits=0)[0] for p in population[20:]]), now_ms=1)
        kept = dict(rec.vault.released())
    assert kept == table(rec.vault) and len(kept) == 30
    assert kanon_report(kept.values(), 3)["below_k"] == 0
    keys = RecordKeys.derive(b"A" * 32, CONSORTIUM)
    assert Vault(tmp_path / "A.sqlite3", keys, MEMBER).released() == kept  # as a restarted node reads it


def test_the_notes_profile_releases_notes_scrubbed_with_the_patient_known_from_an_earlier_ingest(tmp_path):
    import base64

    from ..datasets import SYNTHEA

    rec = recorder(tmp_path, profile=load_profile("notes"))
    patient = json.loads((SYNTHEA / "Patient.ndjson").read_text().splitlines()[0])
    rec.record(items([patient]), now_ms=1)
    notes = [json.loads(line) for line in (SYNTHEA / "DocumentReference.ndjson").read_text().splitlines()
             if f"Patient/{patient['id']}" in line][:20]
    outcome = rec.record(items(notes), now_ms=2)
    assert [r.status for r in outcome.records] == ["recorded"] * len(notes)
    names = set(patient["name"][0]["given"]) | {patient["name"][0]["family"]}
    for row, note in zip(outcome.records, notes, strict=True):
        _, _, released, _ = rec.vault.read(bytes.fromhex(row.record_id))
        text = base64.b64decode(released["content"][0]["attachment"]["data"]).decode()
        raw = base64.b64decode(note["content"][0]["attachment"]["data"]).decode()
        assert "[NAME]" in text and not any(n in text for n in names), text[:300]
        assert len(text) > len(raw) // 2  # the note is released, not dropped
        assert note["date"][:10] not in text
