import copy
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ehrnode.errors import FhirError
from ehrnode.records import fhir
from ehrnode.records.fhir import Item, Problem

from ..datasets import SYNTHEA

NON_PATIENT_TYPES = {"Organization", "Practitioner", "Location"}


def synthea_lines(rtype):
    return (SYNTHEA / f"{rtype}.ndjson").read_bytes().splitlines()


def synthea(rtype, index=0):
    return json.loads(synthea_lines(rtype)[index])


@pytest.fixture(scope="module")
def intake():
    started = time.perf_counter()
    result = fhir.load([SYNTHEA])
    print(f"\nload({SYNTHEA}): {len(result.items)} resources in {time.perf_counter() - started:.2f} s")
    return result


def read(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path, fhir.read_file(path)


def ndjson(*resources):
    return b"".join(json.dumps(r).encode() + b"\n" for r in resources)


def only(problems):
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


def problem_of(resource, source="x.ndjson:1"):
    return fhir.validate(Item(source, resource))


# --- Synthea bulk data ---------------------------------------------------------


def test_synthea_bulk_data_loads_without_problems(intake):
    assert [str(p) for p in intake.problems] == []


def test_synthea_counts_per_type_match_line_counts(intake):
    counts = Counter(item.resource_type for item in intake.items)
    expected = {path.stem: len(path.read_bytes().splitlines()) for path in SYNTHEA.glob("*.ndjson")}
    assert len(expected) == 12
    assert counts == expected


def test_synthea_patient_data_belongs_to_one_of_the_12_patients(intake):
    patients = {item.resource_id for item in intake.items if item.resource_type == "Patient"}
    assert len(patients) == 12
    for item in intake.items:
        if fhir.is_patient_data(item.resource):
            assert fhir.patient_id(item.resource) in patients, item.source


def test_synthea_organizations_practitioners_locations_are_not_patient_data(intake):
    others = [item for item in intake.items if item.resource_type in NON_PATIENT_TYPES]
    assert len(others) == 43 + 43 + 44
    for item in others:
        assert not fhir.is_patient_data(item.resource)
        assert fhir.patient_id(item.resource) is None
    assert all(fhir.is_patient_data(i.resource) for i in intake.items if i.resource_type not in NON_PATIENT_TYPES)


def test_synthea_encounter_links_and_settings(intake):
    encounters = {item.resource_id: item.resource for item in intake.items if item.resource_type == "Encounter"}
    for item in intake.items:
        if item.resource_type in {"Condition", "Procedure", "MedicationRequest", "Immunization", "DocumentReference"}:
            assert fhir.encounter_id(item.resource) in encounters, item.source
    settings_seen = Counter(fhir.setting_of(encounter) for encounter in encounters.values())
    assert set(settings_seen) == {"AMB", "EMER", "IMP", "HH", "VR"}


def test_item_sources_name_file_and_line(intake):
    first = intake.items[0]
    assert first.source == f"{SYNTHEA / 'AllergyIntolerance.ndjson'}:1"
    assert first.resource_type == "AllergyIntolerance"
    assert first.resource_id == synthea("AllergyIntolerance")["id"]


# --- Bundles -------------------------------------------------------------------


def patient_bundle(bundle_type, *, request=False):
    """A Bundle of one Synthea patient's resources that refer to each other by urn:uuid."""
    condition = synthea("Condition")
    pid = condition["subject"]["reference"].split("/")[1]
    eid = condition["encounter"]["reference"].split("/")[1]
    patient = next(json.loads(line) for line in synthea_lines("Patient") if json.loads(line)["id"] == pid)
    encounter = next(json.loads(line) for line in synthea_lines("Encounter") if json.loads(line)["id"] == eid)
    organization = synthea("Organization")
    condition["subject"]["reference"] = f"urn:uuid:{pid}"
    condition["encounter"]["reference"] = f"urn:uuid:{eid}"
    encounter["subject"]["reference"] = f"urn:uuid:{pid}"
    # A new resource without an id: it takes the uuid of its fullUrl.
    del condition["id"]
    entries = [
        {"fullUrl": f"urn:uuid:{pid}", "resource": patient},
        {"fullUrl": f"urn:uuid:{eid}", "resource": encounter},
        {"fullUrl": "urn:uuid:6b0e5a3e-9d2e-4a43-8c55-2f1b6f0e0c11", "resource": condition},
        {"fullUrl": f"http://example.org/fhir/Organization/{organization['id']}", "resource": organization},
    ]
    if request:
        for entry in entries:
            rtype = entry["resource"]["resourceType"]
            entry["request"] = {"method": "POST", "url": rtype}
    return {"resourceType": "Bundle", "id": "b1", "type": bundle_type, "entry": entries}, pid, eid


@pytest.mark.parametrize("bundle_type, request_entries", [("collection", False), ("transaction", True),
                                                          ("batch", True), ("searchset", False), ("document", False)])
def test_bundle_references_are_rewritten_to_type_and_id(bundle_type, request_entries):
    bundle, pid, eid = patient_bundle(bundle_type, request=request_entries)
    items, problems = fhir.read_bytes(json.dumps(bundle).encode(), "bundle.json")
    assert problems == []
    assert [item.source for item in items] == [f"bundle.json entry[{i}]" for i in range(4)]
    patient, encounter, condition, organization = (item.resource for item in items)
    assert condition["id"] == "6b0e5a3e-9d2e-4a43-8c55-2f1b6f0e0c11"
    assert condition["subject"]["reference"] == f"Patient/{pid}"
    assert condition["encounter"]["reference"] == f"Encounter/{eid}"
    assert encounter["subject"]["reference"] == f"Patient/{pid}"
    # Conditional references name no entry and stay as they were.
    assert encounter["location"][0]["location"]["reference"].startswith("Location?identifier=")
    assert fhir.patient_id(condition) == fhir.patient_id(encounter) == fhir.patient_id(patient) == pid
    assert fhir.encounter_id(condition) == eid
    assert not fhir.is_patient_data(organization)
    assert [fhir.validate(item) for item in items] == [None] * 4


def test_bundle_absolute_full_url_references_are_rewritten():
    bundle, pid, _ = patient_bundle("collection")
    org_url = bundle["entry"][3]["fullUrl"]
    bundle["entry"][1]["resource"]["serviceProvider"] = {"reference": org_url}
    items, problems = fhir.read_bytes(json.dumps(bundle).encode(), "bundle.json")
    assert problems == []
    assert items[1].resource["serviceProvider"]["reference"] == "Organization/" + org_url.rsplit("/", 1)[1]


def test_bundle_in_an_ndjson_line_is_split_with_line_and_entry():
    bundle, pid, _ = patient_bundle("collection")
    items, problems = fhir.read_bytes(ndjson(synthea("Organization", 1), bundle), "mixed.ndjson")
    assert problems == []
    assert [item.source for item in items] == ["mixed.ndjson:1"] + [f"mixed.ndjson:2 entry[{i}]" for i in range(4)]


@pytest.mark.parametrize("bundle_type", ["message", "history", "transaction-response", "batch-response", "other"])
def test_bundles_that_are_not_records_are_refused_whole(bundle_type):
    bundle, _, _ = patient_bundle("collection")
    bundle["type"] = bundle_type
    items, problems = fhir.read_bytes(json.dumps(bundle).encode(), "b.json")
    assert items == []
    problem = only(problems)
    assert (problem.source, problem.resource_type, problem.resource_id, problem.field, problem.reason) == (
        "b.json", "Bundle", "b1", "Bundle.type", "bundle_refused")


def test_bundle_without_type_is_invalid():
    bundle, _, _ = patient_bundle("collection")
    del bundle["type"]
    items, problems = fhir.read_bytes(json.dumps(bundle).encode(), "b.json")
    assert items == []
    assert str(only(problems)) == "b.json Bundle/b1: Bundle.type: field required"


def test_bundle_envelope_error_names_the_entry_field():
    bundle, _, _ = patient_bundle("transaction", request=True)
    bundle["entry"][2]["request"]["url"] = 7
    items, problems = fhir.read_bytes(json.dumps(bundle).encode(), "b.json")
    assert items == []
    problem = only(problems)
    assert (problem.field, problem.reason) == ("Bundle.entry[2].request.url", "bundle_invalid")


def test_bundle_entry_without_resource_is_a_problem_for_that_entry_only():
    bundle, _, _ = patient_bundle("transaction", request=True)
    bundle["entry"].insert(1, {"request": {"method": "DELETE", "url": "Observation/123"}})
    items, problems = fhir.read_bytes(json.dumps(bundle).encode(), "t.json")
    assert len(items) == 4
    problem = only(problems)
    assert (problem.source, problem.field, problem.reason) == ("t.json entry[1]", "Bundle.entry[1].resource",
                                                               "no_resource")
    assert "DELETE request" in problem.message


def test_bundle_entry_resource_that_is_not_an_object():
    bundle, _, _ = patient_bundle("collection")
    bundle["entry"][0]["resource"] = ["x"]
    items, problems = fhir.read_bytes(json.dumps(bundle).encode(), "b.json")
    assert len(items) == 3
    assert (only(problems).source, only(problems).reason) == ("b.json entry[0]", "not_object")


def test_nested_bundle_is_refused():
    inner, _, _ = patient_bundle("collection")
    outer = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": inner}]}
    items, problems = fhir.read_bytes(json.dumps(outer).encode(), "b.json")
    assert items == []
    assert (only(problems).source, only(problems).reason) == ("b.json entry[0]", "nested_bundle")


def test_empty_bundle_is_a_problem():
    items, problems = fhir.read_bytes(b'{"resourceType": "Bundle", "type": "collection"}', "b.json")
    assert items == []
    assert only(problems).reason == "empty"


def test_duplicate_in_a_bundle_keeps_the_first():
    bundle, pid, _ = patient_bundle("collection")
    bundle["entry"].append(copy.deepcopy(bundle["entry"][0]))
    items, problems = fhir.read_bytes(json.dumps(bundle).encode(), "b.json")
    assert len(items) == 4
    assert str(only(problems)) == f"b.json entry[4] Patient/{pid}: duplicate: the same resource is at b.json entry[0]"


# --- Bad input -----------------------------------------------------------------


def test_truncated_json_document(tmp_path):
    text = json.dumps(synthea("Patient")).encode()
    path, (items, problems) = read(tmp_path, "patient.json", text[: len(text) // 2])
    assert items == []
    problem = only(problems)
    assert (problem.source, problem.reason) == (f"{path}:1", "invalid_json")
    assert problem.message == "invalid JSON: input ends early (unterminated string); is it truncated?"


def test_truncated_last_ndjson_line_keeps_the_others(tmp_path):
    lines = synthea_lines("Condition")[:3]
    path, (items, problems) = read(tmp_path, "Condition.ndjson", b"\n".join(lines)[:-40])
    assert [item.source for item in items] == [f"{path}:1", f"{path}:2"]
    problem = only(problems)
    assert (problem.source, problem.reason) == (f"{path}:3", "invalid_json")
    assert "truncated" in problem.message


def test_non_utf8_byte_is_located_by_line_and_offset(tmp_path):
    lines = synthea_lines("Condition")[:3]
    bad = lines[1].replace(b'"resourceType"', b'"resource\xffType"', 1)
    data = b"\n".join([lines[0], bad, lines[2]]) + b"\n"
    path, (items, problems) = read(tmp_path, "Condition.ndjson", data)
    assert len(items) == 2
    problem = only(problems)
    column = bad.index(b"\xff")
    assert (problem.source, problem.reason) == (f"{path}:2", "not_utf8")
    assert problem.message == (f"not UTF-8: byte 0xff at byte {column + 1} of the line "
                               f"(offset {len(lines[0]) + 1 + column} in the file)")


def test_non_utf8_in_a_json_document_names_its_line():
    data = b'{\n  "resourceType": "Patient",\n  "id": "p\xe9"\n}'
    items, problems = fhir.read_bytes(data, "p.json")
    assert items == []
    problem = only(problems)
    assert (problem.source, problem.reason) == ("p.json:3", "not_utf8")
    assert "byte 0xe9 at byte 11 of the line" in problem.message


def test_unknown_resource_type():
    resource = {"resourceType": "Patientt", "id": "p1"}
    assert str(problem_of(resource)) == "x.ndjson:1 Patientt/p1: unknown resourceType (not a FHIR R4 resource)"


@pytest.mark.parametrize("rtype", ["HumanName", "Resource", "DomainResource", "fhirtypes", "Patient.Patient",
                                   "../patient", "P" * 500, "PATIENT"])
def test_names_that_are_not_resource_types_are_unknown(rtype):
    assert problem_of({"resourceType": rtype, "id": "p1"}).reason == "unknown_type"


def test_missing_resource_type():
    problem = problem_of({"id": "p1", "name": [{"family": "X"}]})
    assert (problem.reason, problem.resource_type, problem.resource_id) == ("no_resource_type", None, "p1")
    assert str(problem) == "x.ndjson:1 ?/p1: resourceType missing: cannot tell what resource this is"


def test_resource_type_that_is_not_a_string():
    assert problem_of({"resourceType": ["Patient"], "id": "p1"}).reason == "unknown_type"


@pytest.mark.parametrize("rtype, remove, field", [
    ("Encounter", ["status"], "Encounter.status"),
    ("Encounter", ["class"], "Encounter.class"),
    ("Encounter", ["status", "class"], "Encounter.class"),
    ("Condition", ["subject"], "Condition.subject"),
    ("Immunization", ["vaccineCode"], "Immunization.vaccineCode"),
])
def test_missing_required_element_names_the_field(rtype, remove, field):
    resource = synthea(rtype)
    for name in remove:
        del resource[name]
    problem = problem_of(resource, f"{rtype}.ndjson:1")
    assert (problem.resource_type, problem.resource_id, problem.field, problem.reason) == (
        rtype, resource["id"], field, "invalid")
    assert problem.message == "field required"


def test_observation_without_code():
    observation = {"resourceType": "Observation", "id": "abc", "status": "final",
                   "subject": {"reference": "Patient/p1"}}
    assert str(problem_of(observation, "Observation.ndjson:12")) == (
        "Observation.ndjson:12 Observation/abc: Observation.code: field required")


def test_nested_field_is_rendered_as_a_fhir_path():
    patient = synthea("Patient")
    patient["name"][0]["given"] = "Anna"
    problem = problem_of(patient, "Patient.ndjson:1")
    assert problem.field == "Patient.name[0].given"
    assert problem.message == "input should be a valid list"


def test_several_errors_are_summed_up_in_one_problem():
    patient = {"resourceType": "Patient", "id": "p1", "active": "maybe", "birthDate": "soon", "gender": 3}
    problem = problem_of(patient)
    assert problem.field == "Patient.active"
    assert "(and 2 more: Patient.gender, Patient.birthDate)" in problem.message or (
        "(and 2 more: Patient.birthDate, Patient.gender)" in problem.message)


def test_unknown_element_is_named():
    problem = problem_of({"resourceType": "Patient", "id": "p1", "nickname": "x"})
    assert (problem.field, problem.message) == ("Patient.nickname", "not an element of this resource in FHIR R4")


def test_messages_do_not_repeat_field_values():
    patient = synthea("Patient")
    patient["birthDate"] = "SECRET-1970"
    assert "SECRET" not in str(problem_of(patient))


def test_missing_id_is_required():
    condition = synthea("Condition")
    del condition["id"]
    assert str(problem_of(condition, "c.ndjson:4")) == (
        "c.ndjson:4 Condition: Condition.id: id required: a record needs a stable id")
    assert problem_of(condition).reason == "no_id"


@pytest.mark.parametrize("rid", ["", "has space", 5, "x" * 65])
def test_bad_ids_are_refused(rid):
    condition = synthea("Condition")
    condition["id"] = rid
    problem = problem_of(condition)
    assert (problem.field, problem.reason) == ("Condition.id", "invalid")


def test_patient_data_must_reference_one_patient():
    condition = synthea("Condition")
    condition["subject"] = {"reference": "Group/g1"}
    problem = problem_of(condition)
    assert (problem.field, problem.reason) == ("Condition.subject", "no_patient")
    condition["subject"] = {"reference": "urn:uuid:0b6c1b52-0e57-4d4f-9d3c-1a2b3c4d5e6f"}
    assert problem_of(condition).reason == "no_patient"


def test_file_over_the_size_limit_is_refused_without_reading_it(tmp_path, monkeypatch):
    path = tmp_path / "huge.ndjson"
    with path.open("wb") as f:
        f.truncate(100 * 1024 * 1024)

    def no_open(*args, **kwargs):
        raise AssertionError("read_file opened a file it should refuse by size")

    monkeypatch.setattr(Path, "open", no_open)
    items, problems = fhir.read_file(path)
    assert items == []
    problem = only(problems)
    assert (problem.source, problem.reason) == (str(path), "too_large")
    assert str(100 * 1024 * 1024) in problem.message


def test_bytes_over_the_size_limit_are_refused(monkeypatch):
    monkeypatch.setattr(fhir, "MAX_INPUT_BYTES", 1000)
    items, problems = fhir.read_bytes(ndjson(*(synthea("Condition", i) for i in range(3))), "c.ndjson")
    assert (items, only(problems).reason) == ([], "too_large")


@pytest.mark.parametrize("data", [b"", b"\n\n  \r\n", b"\xef\xbb\xbf"])
def test_empty_json_input_is_a_problem(tmp_path, data):
    path, (items, problems) = read(tmp_path, "empty.json", data)
    assert items == []
    assert (only(problems).source, only(problems).reason) == (str(path), "empty")


@pytest.mark.parametrize("name", ["Observation.ndjson", "x.JSONL"])
@pytest.mark.parametrize("data", [b"", b"\n\n  \r\n", b"\xef\xbb\xbf"])
def test_empty_ndjson_is_no_problem_and_load_reports_it(tmp_path, name, data):
    """A bulk export writes a file per type; a type with no resources is an empty file."""
    path, (items, problems) = read(tmp_path, name, data)
    assert (items, problems) == ([], [])
    (tmp_path / "Condition.ndjson").write_bytes(ndjson(synthea("Condition")))
    result = fhir.load([tmp_path])
    assert [item.resource_type for item in result.items] == ["Condition"]
    assert (result.problems, result.empty) == ([], [str(path)])


@pytest.mark.parametrize("data, kind", [(b"[1, 2]", "an array"), (b'"Patient"', "a string"), (b"null", "null"),
                                        (b"42", "a number")])
def test_json_that_is_not_an_object(data, kind):
    items, problems = fhir.read_bytes(data, "x.json")
    assert items == []
    problem = only(problems)
    assert (problem.source, problem.reason) == ("x.json", "not_object")
    assert problem.message.endswith(f"got {kind}")


def test_ndjson_line_that_is_not_an_object():
    items, problems = fhir.read_bytes(ndjson(synthea("Condition")) + b"[1]\n", "c.ndjson")
    assert len(items) == 1
    assert (only(problems).source, only(problems).reason) == ("c.ndjson:2", "not_object")


def test_duplicate_in_one_ndjson_input():
    c0, c1 = synthea("Condition", 0), synthea("Condition", 1)
    items, problems = fhir.read_bytes(ndjson(c0, c1, c0), "Condition.ndjson")
    assert [item.source for item in items] == ["Condition.ndjson:1", "Condition.ndjson:2"]
    assert str(only(problems)) == (
        f"Condition.ndjson:3 Condition/{c0['id']}: duplicate: the same resource is at Condition.ndjson:1")


def test_same_id_with_another_type_is_not_a_duplicate():
    condition = synthea("Condition")
    other = {**synthea("Procedure"), "id": condition["id"]}
    items, problems = fhir.read_bytes(ndjson(condition, other), "mixed.ndjson")
    assert (len(items), problems) == (2, [])


def test_duplicate_across_files_is_found_by_load(tmp_path):
    c0, c1 = synthea("Condition", 0), synthea("Condition", 1)
    first, _ = read(tmp_path, "a.ndjson", ndjson(c0))
    second, _ = read(tmp_path, "b.ndjson", ndjson(c1, c0))
    result = fhir.load([first, second])
    assert [item.source for item in result.items] == [f"{first}:1", f"{second}:1"]
    problem = only(result.problems)
    assert (problem.source, problem.reason) == (f"{second}:2", "duplicate")
    assert problem.message == f"duplicate: the same resource is at {first}:1"


def test_load_reports_problems_in_file_order(tmp_path):
    encounter = synthea("Encounter")
    del encounter["status"]
    data = ndjson(synthea("Condition"), encounter) + b"[1]\n" + ndjson({"resourceType": "Foo", "id": "f"})
    path, _ = read(tmp_path, "mixed.ndjson", data)
    result = fhir.load([path])
    assert [(p.source, p.reason) for p in result.problems] == [
        (f"{path}:2", "invalid"), (f"{path}:3", "not_object"), (f"{path}:4", "unknown_type")]
    assert str(result.problems[0]) == f"{path}:2 Encounter/{encounter['id']}: Encounter.status: field required"


def test_same_file_twice_is_all_duplicates(tmp_path):
    path, _ = read(tmp_path, "a.ndjson", ndjson(synthea("Condition", 0), synthea("Condition", 1)))
    result = fhir.load([path, path])
    assert len(result.items) == 2
    assert [p.reason for p in result.problems] == ["duplicate", "duplicate"]


def test_line_over_the_length_limit(monkeypatch):
    monkeypatch.setattr(fhir, "MAX_LINE_BYTES", 2000)
    short = {"resourceType": "Organization", "id": "o1", "name": "A"}
    long = {"resourceType": "Organization", "id": "o2", "name": "B" * 3000}
    items, problems = fhir.read_bytes(ndjson(short, long, short | {"id": "o3"}), "o.ndjson")
    assert [item.resource_id for item in items] == ["o1", "o3"]
    problem = only(problems)
    assert (problem.source, problem.reason) == ("o.ndjson:2", "line_too_long")


def test_ndjson_is_recognised_in_a_json_file():
    items, problems = fhir.read_bytes(ndjson(synthea("Condition", 0), synthea("Condition", 1)), "export.json")
    assert problems == []
    assert [item.source for item in items] == ["export.json:1", "export.json:2"]


def test_pretty_printed_json_with_trailing_garbage_is_not_taken_for_ndjson():
    data = json.dumps(synthea("Patient"), indent=2).encode() + b"\n}\n"
    items, problems = fhir.read_bytes(data, "p.json")
    assert items == []
    assert only(problems).reason == "invalid_json"


def test_crlf_ndjson_and_byte_order_mark():
    data = b"\xef\xbb\xbf" + ndjson(synthea("Condition", 0), synthea("Condition", 1)).replace(b"\n", b"\r\n")
    items, problems = fhir.read_bytes(data, "c.ndjson")
    assert (len(items), problems) == (2, [])


@pytest.mark.parametrize("text", ['{"resourceType": "Observation", "id": "o", "valueQuantity": {"value": NaN}}',
                                  '{"resourceType": "Patient", "id": "p", "name": [{"text": "\\ud800"}]}',
                                  '{"resourceType": "Patient", "id": "p", "n": ' + "9" * 5000 + "}"])
def test_json_python_accepts_but_fhir_does_not(text):
    items, problems = fhir.read_bytes(text.encode(), "x.json")
    assert (items, only(problems).reason) == ([], "invalid_json")


def test_paired_surrogate_escape_is_fine():
    text = '{"resourceType": "Organization", "id": "o", "name": "\\ud83d\\ude00 clinic"}'
    items, problems = fhir.read_bytes(text.encode(), "x.json")
    assert problems == [] and items[0].resource["name"].startswith("\U0001f600")


def test_deep_nesting_is_a_problem_not_a_crash():
    items, problems = fhir.read_bytes(b"[" * 100_000, "x.json")
    assert only(problems).reason == "too_deep"
    extension = {"url": "u", "valueString": "s"}
    for _ in range(300):
        extension = {"url": "u", "extension": [extension]}
    assert problem_of({"resourceType": "Patient", "id": "p", "extension": [extension]}).reason == "too_deep"


def test_validate_works_in_a_worker_thread():
    extension = {"url": "u", "valueString": "s"}
    for _ in range(300):
        extension = {"url": "u", "extension": [extension]}
    items = [Item("a", synthea("Encounter")),
             Item("b", {"resourceType": "Patient", "id": "p", "extension": [extension]})]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(fhir.validate, items))
    assert results[0] is None and results[1].reason == "too_deep"


def test_unreadable_path_is_a_problem(tmp_path):
    items, problems = fhir.read_file(tmp_path / "missing.ndjson")
    assert (items, only(problems).reason) == ([], "unreadable")


def test_load_reads_only_fhir_files_of_a_directory(tmp_path):
    (tmp_path / "c.ndjson").write_bytes(ndjson(synthea("Condition")))
    (tmp_path / "p.json").write_bytes(json.dumps(synthea("Patient")).encode())
    (tmp_path / "notes.txt").write_text("not FHIR")
    result = fhir.load([tmp_path])
    assert (sorted(item.resource_type for item in result.items), result.problems) == (["Condition", "Patient"], [])


def test_problem_as_error():
    problem = Problem("c.ndjson:3", "Condition", "c1", "Condition.code", "field required", "invalid")
    error = problem.error()
    assert isinstance(error, FhirError)
    assert (str(error), error.reason) == ("c.ndjson:3 Condition/c1: Condition.code: field required", "invalid")
    assert str(Problem("x.json", None, None, None, "empty input", "empty")) == "x.json: empty input"


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_bytes_give_problems_not_exceptions(data):
    for name in ("x.json", "x.ndjson"):
        items, _ = fhir.read_bytes(data, name)
        for item in items:
            fhir.validate(item)


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_damaged_synthea_lines_give_problems_not_exceptions(data):
    line = bytearray(data.draw(st.sampled_from(synthea_lines("Encounter")[:20] + synthea_lines("Patient"))))
    cut = data.draw(st.integers(0, len(line)))
    position = data.draw(st.integers(0, len(line) - 1))
    line[position] = data.draw(st.integers(0, 255))
    items, problems = fhir.read_bytes(bytes(line[:cut] if data.draw(st.booleans()) else line), "x.ndjson")
    for item in items:
        problem = fhir.validate(item)
        if problem is not None:
            str(problem)


# --- Compartment linkage ---------------------------------------------------------


@pytest.mark.parametrize("reference, expected", [
    ("Patient/p1", "p1"),
    ("http://example.org/fhir/Patient/p1", "p1"),
    ("Patient/p1/_history/3", "p1"),
    ("Patient?identifier=http://x|1", None),
    ("urn:uuid:0b6c1b52-0e57-4d4f-9d3c-1a2b3c4d5e6f", None),
    ("#contained", None),
    ("Group/g1", None),
    ("Patient/", None),
    ("Patient", None),
])
def test_patient_id_reads_reference_forms(reference, expected):
    observation = {"resourceType": "Observation", "id": "o", "subject": {"reference": reference}}
    assert fhir.patient_id(observation) == expected


@pytest.mark.parametrize("resource, expected", [
    ({"resourceType": "Patient", "id": "p1"}, "p1"),
    ({"resourceType": "Immunization", "patient": {"reference": "Patient/p1"}}, "p1"),
    ({"resourceType": "Coverage", "beneficiary": {"reference": "Patient/p1"}}, "p1"),
    ({"resourceType": "ResearchSubject", "individual": {"reference": "Patient/p1"}}, "p1"),
    ({"resourceType": "Account", "subject": [{"reference": "Patient/p1"}]}, "p1"),
    ({"resourceType": "Appointment", "participant": [{"actor": {"reference": "Practitioner/d"}},
                                                     {"actor": {"reference": "Patient/p1"}}]}, "p1"),
    ({"resourceType": "Appointment", "participant": [{"actor": {"reference": "Patient/p2"}},
                                                     {"actor": {"reference": "Patient/p1"}}]}, None),
    ({"resourceType": "Condition", "subject": {"identifier": {"value": "123"}}}, None),
    ({"resourceType": "Condition", "subject": "Patient/p1"}, None),
    ({"resourceType": "Organization", "id": "o1"}, None),
    ({"resourceType": 5}, None),
])
def test_patient_id_by_type(resource, expected):
    assert fhir.patient_id(resource) == expected


@pytest.mark.parametrize("resource, expected", [
    ({"resourceType": "Encounter", "id": "e1"}, "e1"),
    ({"resourceType": "Observation", "encounter": {"reference": "Encounter/e1"}}, "e1"),
    ({"resourceType": "DocumentReference", "context": {"encounter": [{"reference": "Encounter/e1"}]}}, "e1"),
    ({"resourceType": "MedicationAdministration", "context": {"reference": "Encounter/e1"}}, "e1"),
    ({"resourceType": "MedicationAdministration", "context": {"reference": "EpisodeOfCare/x"}}, None),
    ({"resourceType": "Claim", "item": [{"encounter": [{"reference": "Encounter/e1"}]},
                                        {"encounter": [{"reference": "Encounter/e1"}]}]}, "e1"),
    ({"resourceType": "Claim", "item": [{"encounter": [{"reference": "Encounter/e1"}]},
                                        {"encounter": [{"reference": "Encounter/e2"}]}]}, None),
    ({"resourceType": "Condition"}, None),
])
def test_encounter_id(resource, expected):
    assert fhir.encounter_id(resource) == expected


@pytest.mark.parametrize("resource, expected", [
    ({"resourceType": "Encounter", "class": {"code": "EMER"}}, "EMER"),
    ({"resourceType": "Encounter", "class": [{"coding": [{"code": "IMP"}]}]}, "IMP"),
    ({"resourceType": "Encounter"}, "unknown"),
    ({"resourceType": "DocumentReference", "context": {"practiceSetting": {"coding": [{"code": "394802001"}]}}},
     "394802001"),
    # Free text is never a setting: it could name anyone.
    ({"resourceType": "DocumentReference", "context": {"practiceSetting": {"text": "Dr. Wei, 13812345678"}}},
     "unknown"),
    ({"resourceType": "DocumentReference", "context": {}}, "unknown"),
    ({"resourceType": "Condition"}, "unknown"),
])
def test_setting_of(resource, expected):
    assert fhir.setting_of(resource) == expected
