"""De-identification against crafted, schema-valid resources: each plants an identifier where a
deny-list would let it through (an extension, a local display, a code element, a contained
place, a reference that does not parse, an age in a Quantity, ...), and none may be released.

Every resource here validates with the R4B models before and after, so each is input an
institution's system could really send.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
from datetime import date

import pytest

from ehrnode.errors import DeidentificationError
from ehrnode.records.deid import SUPPRESSED, Deidentifier, kanon_report, load_profile, released_quasi

KEY = bytes(range(32))
TODAY = date(2025, 6, 1)
PATIENT = {"reference": "Patient/p1"}
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"


def validate(resource: dict) -> None:
    rtype = resource["resourceType"]
    module = importlib.import_module(f"fhir.resources.R4B.{rtype.lower()}")
    getattr(module, rtype).model_validate(resource)


def release(resource: dict, **kwargs) -> dict:
    validate(resource)
    before = copy.deepcopy(resource)
    out = Deidentifier(load_profile(), KEY, today=TODAY).deidentify(resource, patient="p1", **kwargs)
    assert resource == before, "the input was changed"
    validate(out)
    return out


def text(resource: dict) -> str:
    return json.dumps(resource, ensure_ascii=False)


def condition(**fields) -> dict:
    return {"resourceType": "Condition", "id": "c1", "subject": PATIENT,
            "code": {"coding": [{"system": SNOMED, "code": "44054006", "display": "Diabetes mellitus type 2"}]},
            **fields}


# Each case: (name, resource, planted strings none of which may appear in the release).
CASES = [
    ("numeric unknown extensions (Synthea DALY and QALY add up to the age)", {
        "resourceType": "Patient", "id": "p1", "birthDate": "1927-05-21", "gender": "female",
        "extension": [
            {"url": "http://synthetichealth.github.io/synthea/disability-adjusted-life-years", "valueDecimal": 5.345},
            {"url": "http://synthetichealth.github.io/synthea/quality-adjusted-life-years", "valueDecimal": 89.655}]},
     ["5.345", "89.655", "adjusted-life-years", "1927"]),
    ("a local code system's display", condition(code={"coding": [
        {"system": "http://hospital.example.cn/codes", "code": "Z99", "display": "联系人 张三 13812345678"}]}),
     ["张三", "13812345678", "hospital.example.cn"]),
    ("a meta.tag display", condition(meta={"tag": [
        {"system": "http://hospital.example.org/tags", "code": "VIP", "display": "VIP: Senator Smith"}]}),
     ["Senator", "Smith", "VIP", "hospital.example.org"]),
    ("a code element with a required binding holding text", {
        "resourceType": "Encounter", "id": "e1", "status": "Called Mr Smith 555-867-5309", "subject": PATIENT,
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}},
     ["Smith", "867-5309"]),
    ("Patient.gender holding a name", {"resourceType": "Patient", "id": "p1", "gender": "JohnSmith"},
     ["JohnSmith"]),
    ("a language code holding a name", condition(language="John Smith"), ["John Smith"]),
    ("an extension with valueUri", condition(extension=[
        {"url": "http://example.org/fhir/StructureDefinition/home", "valueUri": "http://johnsmith.example.com/"}]),
     ["johnsmith"]),
    ("an extension with valueCode", condition(extension=[
        {"url": "http://example.org/fhir/StructureDefinition/nick", "valueCode": "JohnnyS"}]), ["JohnnyS"]),
    ("an extension with valueId", condition(extension=[
        {"url": "http://example.org/fhir/StructureDefinition/mrn", "valueId": "MRN-7766554"}]), ["7766554"]),
    ("an allow-listed extension's free-text sub-extension", {
        "resourceType": "Patient", "id": "p1", "extension": [{
            "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race", "extension": [
                {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3",
                                                        "display": "White"}},
                {"url": "text", "valueString": "White, son of John Smith of 12 Elm Street"}]}]},
     ["John Smith", "Elm Street"]),
    ("an allow-listed coded extension with a value outside its codes", {
        "resourceType": "Patient", "id": "p1", "extension": [
            {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex", "valueCode": "Smith"}]},
     ["Smith"]),
    ("an Identifier.system holding a name", condition(identifier=[
        {"system": "urn:patient:JohnSmith", "value": "1"}]), ["JohnSmith"]),
    ("implicitRules", condition(implicitRules="http://example.org/rules/for-john-smith"), ["john-smith"]),
    ("a contained home-health Location", {
        "resourceType": "Encounter", "id": "e1", "status": "finished", "subject": PATIENT,
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HH"},
        "contained": [{"resourceType": "Location", "id": "home", "name": "Home of John Smith",
                       "address": {"line": ["12 Elm Street"], "city": "Springfield", "postalCode": "62704",
                                   "state": "IL", "country": "US"},
                       "telecom": [{"system": "phone", "value": "217-555-0199"}],
                       "position": {"longitude": -89.6501, "latitude": 39.7817}}],
        "location": [{"location": {"reference": "#home"}}]},
     ["John Smith", "Elm Street", "Springfield", "62704", "217-555-0199", "-89.6501", "39.7817"]),
    ("a contained Practitioner", condition(
        contained=[{"resourceType": "Practitioner", "id": "dr", "name": [{"family": "Neighbour", "given": ["Ned"]}],
                    "telecom": [{"system": "phone", "value": "217-555-0142"}]}],
        asserter={"reference": "#dr"}), ["Neighbour", "217-555-0142"]),
    ("a reference to a provider that does not parse", condition(
        asserter={"reference": "Smith, John 555-867-5309", "type": "Practitioner"}), ["Smith", "867-5309"]),
    ("a provider search by name", condition(
        asserter={"reference": "Practitioner?name=John Smith"}), ["John Smith"]),
    ("an age of 97 in an Observation (LOINC 30525-0)", {
        "resourceType": "Observation", "id": "o1", "status": "final", "subject": PATIENT,
        "code": {"coding": [{"system": LOINC, "code": "30525-0", "display": "Age"}]},
        "valueQuantity": {"value": 97, "unit": "a", "system": "http://unitsofmeasure.org", "code": "a"}},
     ["97"]),
    ("an age of 93 as an integer, in a component", {
        "resourceType": "Observation", "id": "o1", "status": "final", "subject": PATIENT,
        "code": {"coding": [{"system": LOINC, "code": "11384-7", "display": "Review of systems"}]},
        "component": [{"code": {"coding": [{"system": LOINC, "code": "21612-7", "display": "Age - Reported"}]},
                       "valueInteger": 93}]},
     ["93"]),
    ("a relative's age range", {
        "resourceType": "FamilyMemberHistory", "id": "f1", "status": "completed", "patient": PATIENT,
        "relationship": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
                                     "code": "MTH"}]},
        "ageRange": {"low": {"value": 92, "unit": "a", "system": "http://unitsofmeasure.org", "code": "a"},
                     "high": {"value": 94, "unit": "a", "system": "http://unitsofmeasure.org", "code": "a"}}},
     ["92", "94"]),
    ("a relative's birth date", {
        "resourceType": "FamilyMemberHistory", "id": "f1", "status": "completed", "patient": PATIENT,
        "relationship": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
                                     "code": "FTH"}]},
        "bornDate": "1950-03-17"},
     ["03-17", "1950-"]),
    ("a Quantity whose unit is text", {
        "resourceType": "Observation", "id": "o1", "status": "final", "subject": PATIENT,
        "code": {"coding": [{"system": LOINC, "code": "2345-7", "display": "Glucose"}]},
        "valueQuantity": {"value": 5.5, "unit": "per Dr Smith 555-867-5309"}},
     ["Smith", "867-5309"]),
    ("a CodeableConcept.text of a local code", condition(code={
        "coding": [{"system": "http://hospital.example.org/codes", "code": "X", "display": "Mrs Patel's rash"}],
        "text": "Mrs Patel's rash"}), ["Patel"]),
    ("a known code's display with a phone number in it", condition(code={"coding": [
        {"system": SNOMED, "code": "44054006", "display": "Diabetes, call 13812345678"}]}), ["13812345678"]),
    ("a Coding.version holding free text", condition(code={"coding": [
        {"system": SNOMED, "version": "per Jane Doe 555-867-5309", "code": "44054006"}]}), ["Jane", "867-5309"]),
    ("a contained resource id holding a name", condition(
        contained=[{"resourceType": "Practitioner", "id": "JohnSmith"}], asserter={"reference": "#JohnSmith"}),
     ["JohnSmith"]),
]


@pytest.mark.parametrize("name, resource, planted", CASES, ids=[c[0] for c in CASES])
def test_a_planted_identifier_is_not_released(name, resource, planted):
    out = release(resource)
    released = text(out)
    for needle in planted:
        # As a token: a pseudonym's hex digits may hold "94" by chance.
        found = re.search(rf"(?<![0-9A-Za-z]){re.escape(needle)}(?![0-9A-Za-z])", released)
        assert found is None, f"{name}: {needle!r} released in {released}"


def test_a_list_where_a_string_belongs_is_never_a_crash():
    deid = Deidentifier(load_profile(), KEY, today=TODAY)
    for resource in (
        {"resourceType": "Patient", "id": "p1", "extension": [{"url": ["x"], "valueString": "a"}]},
        {"resourceType": "Patient", "id": "p1", "extension": [
            {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex", "valueCode": ["F"]}]},
        {"resourceType": "Observation", "id": "o1", "status": "final", "subject": PATIENT,
         "code": {"coding": [{"system": LOINC, "code": ["30525-0"]}]}, "valueQuantity": {"value": 95}},
    ):
        try:
            out = deid.deidentify(resource, patient="p1")
        except DeidentificationError:
            continue
        assert "['" not in text(out)


def test_what_clinicians_need_is_kept():
    out = release(condition(meta={"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-condition"]},
                            category=[{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category",
                                                   "code": "problem-list-item", "display": "Problem List Item"}]}]))
    assert out["code"]["coding"] == [{"system": SNOMED, "code": "44054006", "display": "Diabetes mellitus type 2"}]
    edition = {"system": SNOMED, "version": "http://snomed.info/sct/731000124108/version/20230901", "code": "1"}
    assert release(condition(code={"coding": [edition]}))["code"]["coding"][0]["version"] == edition["version"]
    assert out["category"][0]["coding"][0]["display"] == "Problem List Item"
    assert out["meta"]["profile"] == ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-condition"]
    glucose = release({
        "resourceType": "Observation", "id": "o1", "status": "final", "subject": PATIENT,
        "code": {"coding": [{"system": LOINC, "code": "2345-7", "display": "Glucose"}], "text": "Glucose"},
        "valueQuantity": {"value": 5.5, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"}})
    assert glucose["valueQuantity"] == {"value": 5.5, "unit": "mmol/L", "system": "http://unitsofmeasure.org",
                                        "code": "mmol/L"}
    assert glucose["code"]["text"] == "Glucose"
    young = release({
        "resourceType": "Observation", "id": "o2", "status": "final", "subject": PATIENT,
        "code": {"coding": [{"system": LOINC, "code": "30525-0", "display": "Age"}]},
        "valueQuantity": {"value": 54, "unit": "a", "system": "http://unitsofmeasure.org", "code": "a"}})
    assert young["valueQuantity"]["value"] == 54
    old = release({
        "resourceType": "Observation", "id": "o3", "status": "final", "subject": PATIENT,
        "code": {"coding": [{"system": LOINC, "code": "30525-0", "display": "Age"}]},
        "valueQuantity": {"value": 97, "unit": "a", "system": "http://unitsofmeasure.org", "code": "a"}})
    assert old["valueQuantity"]["value"] == 90 and old["valueQuantity"]["comparator"] == ">="
    # A local code keeps a keyed link (the same code, the same pseudonym), never its text.
    local = {"system": "http://hospital.example.org/codes", "code": "X", "display": "anything"}
    one, two = (release(condition(id=i, code={"coding": [local]}))["code"]["coding"][0] for i in ("a", "b"))
    assert one == two and set(one) == {"system", "code"} and one["code"] != "X"


def test_errors_name_the_element_and_never_its_value():
    far = condition(onsetDateTime="0001-01-01")
    deid = Deidentifier(load_profile(), KEY, today=TODAY)
    for days in range(-400, 0, 37):
        try:
            deid.deidentify(far, patient=f"p{days}")
        except DeidentificationError as exc:
            message = str(exc)
            assert "0001" not in message and "onsetDateTime" in message
            break
    else:
        pytest.fail("no patient got an offset that moves 0001-01-01 out of range")
    with pytest.raises(DeidentificationError) as unknown:
        deid.deidentify({"resourceType": "Condition", "id": "c", "John Smith 555": 1}, patient="p")
    assert "John" not in str(unknown.value)


def test_k_anonymity_levels_govern_birth_sex_gender_identity_and_death_and_the_report_tells_it():
    patient = {
        "resourceType": "Patient", "id": "p1", "birthDate": "1927-05-21", "gender": "female",
        "deceasedDateTime": "1989-05-09T20:35:22-04:00",
        "extension": [
            {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex", "valueCode": "F"},
            {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-genderIdentity",
             "valueCodeableConcept": {"coding": [{"system": SNOMED, "code": "446141000124107"}]}},
            {"url": "http://synthetichealth.github.io/synthea/quality-adjusted-life-years", "valueDecimal": 57.18}],
        "address": [{"state": "KS", "country": "US", "postalCode": "66801"}]}
    top = release(patient, level=0)
    assert top["deceasedDateTime"] == "1989" and top["gender"] == "female"
    urls = {e["url"].rsplit("/", 1)[-1] for e in top["extension"]}
    assert urls == {"age-group", "us-core-birthsex", "us-core-genderIdentity"}
    banded = release(patient, level=1)
    assert banded["deceasedBoolean"] is True and "deceasedDateTime" not in banded
    gone = release(patient, level=SUPPRESSED)
    assert set(gone) == {"resourceType", "id"}, gone  # nothing of birth, sex, gender, death or region
    assert released_quasi(gone) == (None, None, None)
    report = kanon_report([released_quasi(gone), released_quasi(top)], 2)
    assert report["suppressed"] == 1 and report["classes"] == 1 and report["below_k"] == 1
    # Two patients alike but for birth sex are two classes, not one.
    other = dict(patient, extension=[{"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex",
                                      "valueCode": "M"}])
    assert released_quasi(release(other, level=3)) != released_quasi(release(patient, level=3))
