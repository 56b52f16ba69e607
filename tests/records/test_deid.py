"""De-identification engine and k-anonymity (ehrnode/records/deid.py, kanon.py).

Most tests run the default profile over the Synthea sample (12 patients, ~3,600
resources) under a fixed key and a fixed "today", so every run is the same.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import importlib
import json
import re
import tempfile
from collections import Counter
from datetime import date, datetime
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ehrnode.errors import DeidentificationError
from ehrnode.records.deid import (
    AGE_GROUP_URL,
    BIRTH_PERIOD_URL,
    SUPPRESSED,
    Deidentifier,
    QuasiIdentifiers,
    kanon_report,
    load_profile,
    quasi_identifiers,
    released_quasi,
    scrub_text,
    shift_date,
    valid_resident_id,
)
from ehrnode.records.deid import text as text_module
from ehrnode.records.deid.notes import PatientFacts
from ehrnode.records.deid.text import has_pattern
from ehrnode.records.kanon import RESTRICTED_ZIP3, choose_levels, zip3

from ..datasets import SYNTHEA as DATA

KEY = bytes(range(32))
TODAY = date(2025, 6, 1)
DIRECTORY = {"Practitioner", "PractitionerRole", "Organization", "Location"}


@cache
def _profile():
    return load_profile()


def _deid(key: bytes = KEY, profile=None) -> Deidentifier:
    return Deidentifier(profile or _profile(), key, today=TODAY)


@cache
def _raw() -> tuple[dict, ...]:
    out = []
    for path in sorted(DATA.glob("*.ndjson")):
        out.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return tuple(out)


def _patient_of(resource: dict) -> str:
    """The local Patient id a Synthea resource belongs to ("" for providers and places)."""
    if resource["resourceType"] == "Patient":
        return resource["id"]
    for key in ("subject", "patient"):
        ref = resource.get(key, {}).get("reference", "")
        if ref.startswith("Patient/"):
            return ref[len("Patient/"):]
    return ""


@cache
def _released() -> tuple[tuple[dict, dict], ...]:
    deid = _deid()
    return tuple((raw, deid.deidentify(raw, patient=_patient_of(raw))) for raw in _raw())


def _patients() -> list[dict]:
    return [r for r in _raw() if r["resourceType"] == "Patient"]


def _profile_from_text(text: str):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "profile.toml"
        path.write_text(text, encoding="utf-8")
        return load_profile(path)


#: The head of a test profile built on the default one.
BASE = '[profile]\nname = "t"\nextends = "default"\n'


def _validate(resource: dict) -> None:
    rtype = resource["resourceType"]
    module = importlib.import_module(f"fhir.resources.R4B.{rtype.lower()}")
    getattr(module, rtype).model_validate(resource)


def _found(needle: str, text: str) -> bool:
    # Whole tokens only: a 5-digit ZIP can occur inside a hex pseudonym by chance.
    return needle in text and re.search(rf"(?<![A-Za-z0-9]){re.escape(needle)}(?![A-Za-z0-9])", text) is not None


def _attachment_text(resource: dict) -> str:
    texts = []
    for content in resource.get("content", []):
        data = content.get("attachment", {}).get("data")
        if data:
            texts.append(base64.b64decode(data).decode("utf-8", "replace"))
    return "\n".join(texts)


def _directory_displays(node, *, remove: bool):
    """The displays of references to providers and places in ``node`` (removed if asked)."""
    if isinstance(node, dict):
        target = str(node.get("reference", "")).split("/")[0].split("?")[0]
        if target in DIRECTORY and "display" in node:
            yield node.pop("display") if remove else node["display"]
        for value in list(node.values()):
            yield from _directory_displays(value, remove=remove)
    elif isinstance(node, list):
        for value in node:
            yield from _directory_displays(value, remove=remove)


# --- the Synthea sample, end to end ---------------------------------------------------


def test_every_resource_of_every_type_deidentifies_to_valid_fhir_r4_without_touching_the_input():
    raws = copy.deepcopy(list(_raw()))
    deid = _deid()
    kinds = Counter()
    for raw in raws:
        before = json.dumps(raw, sort_keys=True)
        out = deid.deidentify(raw, patient=_patient_of(raw))
        assert json.dumps(raw, sort_keys=True) == before, "the input was changed"
        _validate(out)
        kinds[out["resourceType"]] += 1
    assert sum(kinds.values()) == len(raws) > 3500
    assert set(kinds) == {p.stem for p in DATA.glob("*.ndjson")}


def test_no_patient_identifier_survives_in_any_released_resource():
    released = _released()
    everything = "\n".join(json.dumps(out, ensure_ascii=False) + _attachment_text(out) for _, out in released)
    # Providers and places are released as they are (they are not patient data), and a
    # patient can share a town, a ZIP code or a surname with one of them. A value that
    # also appears in that directory content is looked for everywhere except there:
    # directory entries and the displays of references to them.
    directory_text = "\n".join(json.dumps(r) for r in _raw() if r["resourceType"] in DIRECTORY)
    directory_text += "\n".join(d for r in _raw() for d in _directory_displays(r, remove=False))
    patient_facing = []
    for _, out in released:
        if out["resourceType"] not in DIRECTORY:
            stripped = copy.deepcopy(out)
            list(_directory_displays(stripped, remove=True))
            patient_facing.append(json.dumps(stripped, ensure_ascii=False) + _attachment_text(out))
    patient_facing = "\n".join(patient_facing)
    own: dict[str, list[str]] = {}
    for raw, out in released:
        own.setdefault(_patient_of(raw), []).append(json.dumps(out))

    checked = 0
    for patient in _patients():
        needles = {patient["id"]}
        for name in patient.get("name", []):
            needles.update(name.get("given", []))
            needles.update(name.get("prefix", []))
            needles.add(name["family"])
        for ext in patient.get("extension", []):
            if ext["url"].endswith("patient-mothersMaidenName"):
                needles.update(ext["valueString"].split())
        needles.update(i["value"] for i in patient.get("identifier", []))
        needles.update(t["value"] for t in patient.get("telecom", []))
        for address in patient.get("address", []):
            needles.update(address.get("line", []))
            needles.update(v for v in (address.get("city"), address.get("postalCode")) if v)
        for needle in needles:
            where = patient_facing if _found(needle, directory_text) else everything
            assert not _found(needle, where), f"{needle!r} of Patient/{patient['id']} was released"
        # A shifted date of one patient may equal another's birth date by chance; what
        # must never happen is the patient's own birth date in the patient's own records.
        assert not any(patient["birthDate"] in text for text in own[patient["id"]])
        checked += len(needles) + 1
    assert checked > 150


def test_patient_keeps_only_safe_harbor_demographics():
    for raw, out in _released():
        if raw["resourceType"] != "Patient":
            continue
        for gone in ("name", "telecom", "identifier", "photo", "contact", "text"):
            assert gone not in out
        assert out["gender"] == raw["gender"]
        assert out["id"] != raw["id"]
        urls = [e["url"] for e in out.get("extension", [])]
        assert not any(u.endswith(("mothersMaidenName", "birthPlace")) for u in urls)
        assert any(u.endswith("us-core-race") for u in urls) and any(u.endswith("us-core-birthsex") for u in urls)
        if raw["birthDate"] <= "1935-06-01":  # 90 or over on TODAY
            assert "birthDate" not in out
            assert {"url": AGE_GROUP_URL, "valueString": "90+"} in out["extension"]
        else:
            assert out["birthDate"] == raw["birthDate"][:4]
        if "deceasedDateTime" in raw:
            assert out["deceasedDateTime"] == raw["deceasedDateTime"][:4]
        [address] = out["address"]
        assert set(address) <= {"state", "country", "postalCode"}
        assert address["state"] == raw["address"][0]["state"]
        assert address["postalCode"] == zip3(raw["address"][0]["postalCode"], "US")
        assert "geolocation" not in json.dumps(out)


def test_reference_displays_go_but_provider_and_place_references_stay():
    for raw, out in _released():
        if raw["resourceType"] != "Encounter":
            continue
        assert "display" not in out["subject"]
        assert out["serviceProvider"] == {"reference": raw["serviceProvider"]["reference"]}
        assert out["participant"][0]["individual"] == {"reference": raw["participant"][0]["individual"]["reference"]}
        assert out["location"] == [{"location": {"reference": raw["location"][0]["location"]["reference"]}}]
    profile = _profile_from_text(BASE + "[references]\nkeep_display = true\n")
    encounter = next(r for r in _raw() if r["resourceType"] == "Encounter")
    out = Deidentifier(profile, KEY).deidentify(encounter, patient=_patient_of(encounter))
    assert out["location"] == encounter["location"] and "display" not in out["subject"]


def test_identifiers_on_clinical_resources_are_pseudonymized_in_their_system():
    again = _deid()
    profile = _profile()
    for raw, out in _released():
        if raw["resourceType"] not in ("Encounter", "DocumentReference"):
            continue
        [ident], [before] = out["identifier"], raw["identifier"]
        # A known system (urn:ietf:rfc:3986) says what the identifier is; another, such as an
        # institution's own, is pseudonymized too (it may be any text).
        expected = before["system"] if profile.known(before["system"]) else again.reference(before["system"])
        assert ident["system"] == expected and ident["value"] != before["value"]
        assert ident["value"] == again.identifier_value(before["system"], before["value"])
        if before["value"].startswith("urn:uuid:"):
            assert ident["value"].startswith("urn:uuid:")


def test_free_text_and_device_identifiers_are_dropped():
    for raw, out in _released():
        if raw["resourceType"] == "DocumentReference":
            assert out["content"][0]["attachment"] == {"contentType": raw["content"][0]["attachment"]["contentType"]}
        if raw["resourceType"] == "Device":
            for gone in ("udiCarrier", "serialNumber", "lotNumber", "distinctIdentifier"):
                assert gone not in out
            assert out["deviceName"] == raw["deviceName"]
        if raw["resourceType"] == "Condition":
            assert out["code"] == raw["code"]  # codes, displays, and a text that repeats a display


# --- dates ----------------------------------------------------------------------------


def test_date_shift_is_per_patient_stable_nonzero_and_within_range():
    deid, again, other = _deid(), _deid(), _deid(bytes(32))
    shifts = {p["id"]: deid.date_shift_days(p["id"]) for p in _patients()}
    profile = _profile()
    assert all(s != 0 and profile.shift_min_days <= s <= profile.shift_max_days for s in shifts.values())
    assert shifts == {pid: again.date_shift_days(pid) for pid in shifts}
    assert shifts != {pid: other.date_shift_days(pid) for pid in shifts}
    assert len(set(shifts.values())) >= len(shifts) - 2  # patients mostly differ
    narrow = _profile_from_text(
        '[profile]\nname="t"\nextends="default"\n[date-shift]\nmin_days=-1\nmax_days=1\n')
    assert {Deidentifier(narrow, bytes([i]) * 32).date_shift_days("p") for i in range(40)} == {-1, 1}


def test_date_shift_preserves_intervals_precision_and_zone():
    deid = _deid()
    compared = 0
    for raw, out in _released():
        if raw["resourceType"] not in ("Encounter", "Procedure", "DocumentReference"):
            continue
        offset = deid.date_shift_days(_patient_of(raw))
        period_key = {"Encounter": "period", "Procedure": "performedPeriod"}.get(raw["resourceType"])
        pairs = [(raw[period_key], out[period_key])] if period_key else [(raw["context"]["period"],
                                                                          out["context"]["period"])]
        if raw["resourceType"] == "DocumentReference":
            pairs.append(({"start": raw["date"]}, {"start": out["date"]}))
        for before, after in pairs:
            for edge in before:
                b, a = before[edge], after[edge]
                assert len(a) == len(b) and a[10:] == b[10:], (b, a)  # time, fraction and zone as written
                assert (datetime.fromisoformat(a) - datetime.fromisoformat(b)).days == offset
            if "end" in before:
                length = datetime.fromisoformat(before["end"]) - datetime.fromisoformat(before["start"])
                assert datetime.fromisoformat(after["end"]) - datetime.fromisoformat(after["start"]) == length
            compared += 1
    assert compared > 2500


def test_shift_date_keeps_each_fhir_date_form():
    assert shift_date("2020-02-28", 1) == "2020-02-29"
    assert shift_date("2020-12-31T23:59:59.123Z", 1) == "2021-01-01T23:59:59.123Z"
    assert shift_date("2021-03-01T08:00:00+05:30", -1) == "2021-02-28T08:00:00+05:30"
    assert shift_date("1987-11-19T00:22:16.824-05:00", 10) == "1987-11-29T00:22:16.824-05:00"
    assert shift_date("2020", 100) == "2020" and shift_date("2020", -100) == "2020"  # a year stays a year
    assert shift_date("2020", 200) == "2021"
    assert shift_date("2020-06", 10) == "2020-06" and shift_date("2020-06", 20) == "2020-07"
    for bad in ("20-01-01", "2020-1-1", "yesterday", "2020-01-01T"):
        with pytest.raises(ValueError):
            shift_date(bad, 1)


def test_year_only_dates_can_be_configured():
    profile = _profile_from_text("""
[profile]
name = "year-only"
extends = "default"
[rules."*"]
"<date>" = "generalize"
"<dateTime>" = "generalize"
"<instant>" = "redact"
""")
    deid = Deidentifier(profile, KEY, today=TODAY)
    encounter = next(r for r in _raw() if r["resourceType"] == "Encounter")
    out = deid.deidentify(encounter, patient=_patient_of(encounter))
    assert out["period"] == {"start": encounter["period"]["start"][:4], "end": encounter["period"]["end"][:4]}
    _validate(out)


# --- pseudonyms and references -----------------------------------------------------------


def test_pseudonyms_are_stable_and_references_between_released_resources_still_match():
    released = _released()
    ids = {(raw["resourceType"], raw["id"]): out["id"] for raw, out in released}
    links = 0
    for raw, out in released:
        if raw["resourceType"] in DIRECTORY:
            assert out["id"] == raw["id"]
        else:
            assert out["id"] != raw["id"]
        for key in ("encounter", "subject", "patient"):
            ref = raw.get(key, {}).get("reference", "")
            if "/" in ref:
                rtype, rid = ref.split("/")
                assert out[key]["reference"] == f"{rtype}/{ids[(rtype, rid)]}"
                links += 1
        for reason in raw.get("reasonReference", []):
            rtype, rid = reason["reference"].split("/")
            assert {"reference": f"{rtype}/{ids[(rtype, rid)]}"} in out["reasonReference"]
            links += 1
    assert links > 6000
    again = _deid()
    sample = [r for r in _raw() if r["resourceType"] == "Procedure"][:50]
    assert [again.deidentify(r, patient=_patient_of(r)) for r in sample] == \
        [out for raw, out in released if raw["resourceType"] == "Procedure"][:50]
    other = _deid(bytes(32))
    assert other.deidentify(sample[0], patient=_patient_of(sample[0]))["id"] != ids[("Procedure", sample[0]["id"])]


def test_reference_forms():
    deid = _deid()
    p = deid.pseudonym("abc")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", p)
    assert deid.reference("Patient/abc") == f"Patient/{p}"
    assert deid.reference("urn:uuid:abc") == f"urn:uuid:{p}"
    assert deid.reference("https://ehr.example.org/fhir/Patient/abc/_history/3") == f"Patient/{p}"
    assert deid.reference("#contained-1") == "#" + deid.local_id("contained-1")
    assert deid.reference("Practitioner/42") == "Practitioner/42"
    assert deid.reference("Patient?identifier=http://hl7.org/fhir/sid/us-ssn|999-11-2222").startswith("Patient/")
    assert "999-11-2222" not in deid.reference("Patient?identifier=http://hl7.org/fhir/sid/us-ssn|999-11-2222")
    observation = {
        "resourceType": "Observation", "id": "obs", "status": "final",
        "contained": [{"resourceType": "Patient", "id": "p1", "name": [{"family": "Hidden"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": "#p1", "display": "Hidden"},
        "performer": [{"identifier": {"system": "http://hl7.org/fhir/sid/us-npi", "value": "9999974493"}}],
        "specimen": {"reference": "urn:uuid:abc"},
    }
    out = deid.deidentify(observation, patient="p1")
    assert out["contained"][0]["id"] == deid.local_id("p1") and "name" not in out["contained"][0]
    assert out["subject"] == {"reference": "#" + deid.local_id("p1")}
    assert out["specimen"] == {"reference": f"urn:uuid:{p}"}
    # A performer given only by identifier may be the patient: pseudonymized.
    assert out["performer"][0]["identifier"]["value"] != "9999974493"
    _validate(out)


# --- generalization ---------------------------------------------------------------------


def test_zip3_keeps_three_digits_except_the_restricted_areas():
    assert len(RESTRICTED_ZIP3) == 17
    assert zip3("66801", "US") == "668" and zip3("66801-2504", None) == "668" and zip3("668012504", "USA") == "668"
    for area in ("036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831", "878", "879",
                 "884", "890", "893"):
        assert zip3(area + "12", "US") == "000"
    assert zip3("100022", "CN") is None and zip3("SW1A 1AA", "GB") is None and zip3("6680", "US") is None
    patient = {"resourceType": "Patient", "id": "z", "gender": "female", "birthDate": "1980-02-03",
               "address": [{"line": ["1 Main St"], "city": "Tiny", "state": "WY", "postalCode": "83012",
                            "country": "US"}]}
    out = _deid().deidentify(patient, patient="z")
    assert out["address"] == [{"country": "US", "state": "WY", "postalCode": "000"}]


def test_ages_of_90_and_over_are_one_category():
    deid = _deid()

    def patient(birth):
        return deid.deidentify({"resourceType": "Patient", "id": "a", "birthDate": birth}, patient="a")

    assert patient("1935-06-02")["birthDate"] == "1935"  # 89 on TODAY
    for birth in ("1935-06-01", "1935", "1901-01-01"):
        out = patient(birth)
        assert "birthDate" not in out and out["extension"] == [{"url": AGE_GROUP_URL, "valueString": "90+"}]
        _validate(out)
    condition = {"resourceType": "Condition", "id": "c", "subject": {"reference": "Patient/a"},
                 "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}]},
                 "onsetAge": {"value": 1100, "unit": "months", "system": "http://unitsofmeasure.org", "code": "mo"}}
    out = deid.deidentify(condition, patient="a")
    assert out["onsetAge"] == {"value": 90, "comparator": ">=", "unit": "a", "system": "http://unitsofmeasure.org",
                               "code": "a"}
    condition["onsetAge"] = {"value": 45, "unit": "a", "system": "http://unitsofmeasure.org", "code": "a"}
    assert deid.deidentify(condition, patient="a")["onsetAge"] == condition["onsetAge"]
    relative = {"resourceType": "RelatedPerson", "id": "r", "patient": {"reference": "Patient/a"},
                "birthDate": "1920-01-01", "name": [{"family": "Elder"}]}
    out = deid.deidentify(relative, patient="a")
    assert "birthDate" not in out and "name" not in out


# --- the Chinese counterparts --------------------------------------------------------------


def test_resident_id_validator_checks_the_iso_7064_character_and_the_birth_date():
    weights = [2 ** (17 - i) % 11 for i in range(17)]
    assert weights == [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    for first17 in ("11010519491231002", "44052418800101001", "31011519900307123"):
        check = "10X98765432"[sum(int(d) * w for d, w in zip(first17, weights, strict=False)) % 11]
        assert valid_resident_id(first17 + check)
        assert not valid_resident_id(first17 + ("0" if check != "0" else "1"))
    assert valid_resident_id("11010519491231002X") and valid_resident_id("11010519491231002x")
    assert not valid_resident_id("110105194912310021")  # wrong check character
    assert not valid_resident_id("11010519491331002X")  # month 13
    assert not valid_resident_id("1101051949123100") and not valid_resident_id("11010519491231002Y")


def test_a_chinese_patient_loses_name_id_mobile_and_address_details():
    patient = {
        "resourceType": "Patient", "id": "cn-1",
        "identifier": [
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "NNCHN"}]},
             "system": "urn:oid:2.16.156.10011.1.1", "value": "44010619900307123X"},
            {"system": "urn:ehrnode:hosp:mrn", "value": "ZY2023001"}],
        "name": [{"use": "official", "text": "王秀英", "family": "王", "given": ["秀英"]}],
        "telecom": [{"system": "phone", "value": "13812345678", "use": "mobile"},
                    {"system": "phone", "value": "+86 139-0000-1234"}],
        "gender": "female", "birthDate": "1990-03-07",
        "address": [{"use": "home", "text": "广东省广州市天河区天河路385号", "line": ["天河路385号"],
                     "district": "天河区", "city": "广州市", "state": "广东省", "postalCode": "510620",
                     "country": "CN"}],
        "contact": [{"name": {"text": "王伟"}, "telecom": [{"system": "phone", "value": "13987654321"}]}],
    }
    out = _deid().deidentify(patient, patient="cn-1")
    text = json.dumps(out, ensure_ascii=False)
    for gone in ("王", "秀英", "44010619900307123X", "ZY2023001", "13812345678", "139-0000-1234", "13987654321",
                 "天河", "广州市", "510620", "1990-03-07", "cn-1"):
        assert gone not in text, gone
    assert out["address"] == [{"country": "CN", "state": "广东省"}]
    assert out["birthDate"] == "1990" and out["gender"] == "female"
    _validate(out)


# --- free text -------------------------------------------------------------------------------


NOTE = (
    "Seen 2021-03-04 and 03/04/2021 (also March 4, 2021; 2021年3月4日 and 2021-03-04T10:30:00+08:00). "
    "SSN 999-12-3456, phone (555) 810-7203 or 555.478.8993 or +1 555 123 4567, mobile 13812345678 "
    "and +86 139-0000-1234, e-mail jane.doe@example.org, portal https://portal.example.org/p?id=7 "
    "from 192.168.10.24 and 2001:db8::8a2e:370:7334, MRN: A1234567, 病历号：ZY2023001, "
    "身份证 11010519491231002X, DL S99940903, a 92-year-old woman (92岁). "
    "Assessment: hypertension, lisinopril 10 mg daily, BP 120/80."
)
NOTE_SECRETS = ("2021", "03/04", "March 4", "3月4日", "999-12-3456", "810-7203", "478.8993", "123 4567", "13812345678",
                "139-0000-1234", "jane.doe", "portal.example", "192.168", "2001:db8", "A1234567", "ZY2023001",
                "11010519491231002X", "S99940903", "92")


def test_scrub_replaces_identifying_patterns_and_keeps_clinical_words():
    scrubbed = scrub_text(NOTE)
    for secret in NOTE_SECRETS:
        assert secret not in scrubbed, (secret, scrubbed)
    for kept in ("hypertension", "lisinopril 10 mg daily", "BP 120/80", "Assessment", "woman"):
        assert kept in scrubbed
    assert scrubbed.count("[REDACTED]") >= 18


_PATTERN_TEXT = st.one_of(
    *(st.from_regex(re.compile(p, re.IGNORECASE)) for p in text_module._SCRUB_PATTERNS.values()),
    st.text(), st.sampled_from(["Body Mass Index", "WWW.x", "wWw.example", "\u212a", "\u0130 \u0131", "a@b",
                                "\uff11\uff12\uff13\uff14\uff15\uff16", "::1", "Sept 2020"]),
)


@settings(max_examples=1500, deadline=None)
@given(_PATTERN_TEXT)
def test_text_without_a_candidate_character_is_passed_over_exactly_when_no_pattern_matches(value):
    """The quick check before the patterns (a digit, "@", ":" or "www.") never changes an answer:
    every string a pattern matches has one, so scrubbing and detection agree with the patterns."""
    matched = text_module._SCRUB.search(value) is not None
    if matched:
        assert text_module._CANDIDATE.search(value) is not None, value
    assert has_pattern(value) is matched
    assert scrub_text(value) == text_module._SCRUB.sub(text_module.REDACTED, value)


def test_a_profile_can_scrub_notes_narratives_and_text_attachments_instead_of_dropping_them(tmp_path):
    path = tmp_path / "scrub.toml"
    path.write_text("""
[profile]
name = "scrub"
extends = "default"
[rules."*"]
"<Narrative>" = "keep"
"<Narrative>.div" = "scrub"
"<Annotation>" = "keep"
"<Annotation>.text" = "scrub"
"<Attachment>.data" = "scrub"
""")
    deid = Deidentifier(load_profile(path), KEY, today=TODAY)
    document = next(r for r in _raw() if r["resourceType"] == "DocumentReference")
    patient = next(r for r in _patients() if r["id"] == _patient_of(document))
    out = deid.deidentify(document, patient=_patient_of(document), facts=PatientFacts.of(patient))
    attachment = out["content"][0]["attachment"]
    text = base64.b64decode(attachment["data"]).decode()
    # The patient's name is gone, the note's date moved by the patient's offset.
    shifted = shift_date(document["date"][:10], deid.date_shift_days(_patient_of(document)))
    assert "[NAME]" in text and document["date"][:10] not in text and shifted in text
    assert not any(n in text for n in patient["name"][0]["given"] + [patient["name"][0]["family"]])
    raw = base64.b64decode(attachment["data"])
    assert attachment["size"] == len(raw)
    assert attachment["hash"] == base64.b64encode(hashlib.sha1(raw).digest()).decode()
    _validate(out)

    observation = {
        "resourceType": "Observation", "id": "o", "status": "final",
        "text": {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><p>{NOTE}</p></div>'},
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        "subject": {"reference": "Patient/p"},
        "note": [{"authorString": "Nurse Jane Doe", "time": "2021-03-04T10:30:00Z", "text": NOTE}],
    }
    out = deid.deidentify(observation, patient="p")
    assert out["text"]["div"].startswith('<div xmlns="http://www.w3.org/1999/xhtml"><p>')
    assert "authorString" not in out["note"][0] and out["note"][0]["time"] != "2021-03-04T10:30:00Z"
    for secret in NOTE_SECRETS:
        assert secret not in out["text"]["div"] and secret not in out["note"][0]["text"]
    _validate(out)
    # Anything but text cannot be scrubbed, so it is not released.
    pdf = dict(document, content=[{"attachment": {"contentType": "application/pdf", "data": "JVBERi0xLjQK",
                                                  "size": 9, "hash": "AAAA"}}])
    assert deid.deidentify(pdf, patient=_patient_of(document))["content"][0]["attachment"] == \
        {"contentType": "application/pdf"}


def test_codeable_concept_text_is_kept_only_where_it_repeats_a_display():
    condition = {"resourceType": "Condition", "id": "c", "subject": {"reference": "Patient/p"},
                 "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003",
                                      "display": "Hypertensive disorder"}], "text": "hypertensive disorder"}}
    assert _deid().deidentify(condition, patient="p")["code"]["text"] == "hypertensive disorder"
    condition["code"]["text"] = "BP high since Mrs. Smith's fall on 3/4"
    assert "text" not in _deid().deidentify(condition, patient="p")["code"]
    # A required CodeableConcept left empty is marked as masked, so the resource stays valid.
    observation = {"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "Jane's pain diary"},
                   "subject": {"reference": "Patient/p"}}
    out = _deid().deidentify(observation, patient="p")
    assert out["code"] == {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                                          "valueCode": "masked"}]}
    _validate(out)


# --- k-anonymity -----------------------------------------------------------------------------


def _population() -> dict[str, QuasiIdentifiers]:
    return {p["id"]: quasi_identifiers(p) for p in _patients()}


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 14])
def test_chosen_levels_give_every_released_class_k_members_or_suppress(k):
    deid = _deid()
    population = _population()
    levels = deid.choose_levels(population, k)
    assert set(levels) == set(population)
    released = []
    for patient in _patients():
        out = deid.deidentify(patient, patient=patient["id"], level=levels[patient["id"]])
        _validate(out)
        value = released_quasi(out)
        assert value == deid.hierarchy.release(population[patient["id"]], levels[patient["id"]])
        released.append(value)
    report = kanon_report(released, k)
    suppressed = sum(1 for level in levels.values() if level == SUPPRESSED)
    assert report["below_k"] == 0 and report["suppressed"] == suppressed
    assert report["k_reached"] >= k or report["classes"] == 0
    if k == 1:
        assert set(levels.values()) == {0}
    if k > len(population):
        assert suppressed == len(population)


def test_patients_released_earlier_count_towards_classes_without_being_changed():
    deid, population, k = _deid(), _population(), 3
    ids = sorted(population)
    first = {pid: population[pid] for pid in ids[:8]}
    first_levels = deid.choose_levels(first, k)
    released = {pid: deid.hierarchy.release(first[pid], level) for pid, level in first_levels.items()}
    rest = {pid: population[pid] for pid in ids[8:]}
    rest_levels = deid.choose_levels(rest, k, released=released)
    assert set(rest_levels) == set(rest)
    everything = list(released.values()) + [deid.hierarchy.release(rest[p], lvl) for p, lvl in rest_levels.items()]
    report = kanon_report(everything, k)
    assert report["below_k"] == 0 and report["patients"] == len(population)


def test_generalization_levels_and_their_fhir_form():
    deid = _deid()
    patient = {"resourceType": "Patient", "id": "g", "gender": "male", "birthDate": "1962-08-09",
               "address": [{"line": ["1 Elm"], "city": "Wichita", "state": "KS", "postalCode": "67216",
                            "country": "US"}]}
    expected = [("1962", "male", "US/KS/672"), ("1960-1964", "male", "US/KS"), ("1960-1969", "male", "US"),
                (None, "male", None), (None, None, None)]
    for level, value in enumerate(expected):
        out = deid.deidentify(patient, patient="g", level=level)
        _validate(out)
        assert released_quasi(out) == value
    banded = deid.deidentify(patient, patient="g", level=1)
    assert "birthDate" not in banded
    assert banded["extension"] == [{"url": BIRTH_PERIOD_URL, "valuePeriod": {"start": "1960", "end": "1964"}}]
    old = dict(patient, birthDate="1930-01-01")
    assert [released_quasi(deid.deidentify(old, patient="g", level=lvl))[0] for lvl in range(5)] == \
        ["90+", "90+", "90+", None, None]


def test_module_level_choice_uses_the_fullest_hierarchy_and_stays_valid_for_the_profile():
    # The recorder calls deid.choose_levels(population, k) without a profile.
    population = _population()
    levels = choose_levels(population, 2)
    deid = _deid()
    report = kanon_report([deid.hierarchy.release(population[p], lvl) for p, lvl in levels.items()], 2)
    assert report["below_k"] == 0


def test_kanon_report_matches_a_hand_count():
    released = [("1960", "male", "US/KS/672")] * 3 + [("1960-1964", "female", "US/KS")] * 2 + \
        [("90+", "female", "US")] + [(None, None, None)] * 2 + [["1960", "male", "US/KS/672"]]
    assert kanon_report(released, 2) == {"k_target": 2, "k_reached": 1, "classes": 3, "patients": 9,
                                         "suppressed": 2, "below_k": 1}
    assert kanon_report([], 5) == {"k_target": 5, "k_reached": 0, "classes": 0, "patients": 0, "suppressed": 0,
                                   "below_k": 0}


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("body, names", [
    ('[rules.Patient]\n"name" = "obliterate"\n', ['"name"', "obliterate", "unknown method"]),
    ('[rules.Patient]\n"name" = \n', ["TOML"]),
    ('[kanonymity]\nk = 2\nl = 3\n', ["[kanonymity] l", "unknown key"]),
    ('[colours]\nred = 1\n', ["[colours]", "unknown table"]),
    ('[rules.Patient]\n"adress.line" = "redact"\n', ['"adress.line"', "no element 'adress'"]),
    ('[rules.Patinet]\n"name" = "redact"\n', ['[rules."Patinet"]', "not a FHIR resource type"]),
    ('[rules."*"]\n"<Nmae>" = "redact"\n', ['"<Nmae>"', "not a FHIR data type"]),
    ('[rules."*"]\n"<string>" = "date-shift"\n', ['"<string>"', "date-shift cannot apply to string"]),
    ('[rules."*"]\n"status" = "redact"\n', ['"status"', "every resource has no element"]),
    ('[rules.Patient]\n"birthDate" = "date-shift"\n', ['"birthDate"', "quasi-identifier"]),
    ('[rules.Condition]\n"abatementString" = "coded-text"\n', ['"abatementString"', "CodeableConcept"]),
    ('[extensions]\n"http://example.org/x" = "scrub"\n', ['"http://example.org/x"', "keep, redact"]),
    ('[date-shift]\nmin_days = 10\nmax_days = 1\n', ["[date-shift]"]),
])
def test_bad_profiles_are_refused_naming_the_file_and_the_rule(tmp_path, body, names):
    path = tmp_path / "bad.toml"
    path.write_text(BASE + body, encoding="utf-8")
    with pytest.raises(DeidentificationError) as caught:
        load_profile(path)
    assert caught.value.reason == "bad_profile"
    message = str(caught.value)
    assert message.startswith(str(path))
    for name in names:
        assert name in message, message


def test_a_missing_profile_file_is_refused(tmp_path):
    with pytest.raises(DeidentificationError, match="cannot read") as caught:
        load_profile(tmp_path / "nope.toml")
    assert str(tmp_path / "nope.toml") in str(caught.value)


def test_what_cannot_be_released_safely_is_refused():
    deid = _deid()
    with pytest.raises(DeidentificationError, match="unknown element nickname"):
        deid.deidentify({"resourceType": "Patient", "id": "x", "nickname": "Bob"}, patient="x")
    with pytest.raises(DeidentificationError, match="modifier extension"):
        deid.deidentify({"resourceType": "Condition", "id": "c", "subject": {"reference": "Patient/x"},
                         "modifierExtension": [{"url": "http://example.org/not-really", "valueString": "Bob"}]},
                        patient="x")
    with pytest.raises(DeidentificationError, match="Bundle"):
        deid.deidentify({"resourceType": "Bundle", "type": "collection"}, patient="x")
    with pytest.raises(DeidentificationError, match="unknown resource type"):
        deid.deidentify({"resourceType": "Spaceship", "id": "x"}, patient="x")
    with pytest.raises(DeidentificationError) as caught:
        deid.deidentify({"resourceType": "Patient", "id": "x"}, patient="x", level=9)
    assert caught.value.reason == "bad_level"
    with pytest.raises(DeidentificationError) as caught:
        Deidentifier(_profile(), b"short")
    assert caught.value.reason == "bad_key"
    with pytest.raises(DeidentificationError, match="patient"):
        deid.deidentify({"resourceType": "Encounter", "id": "e", "status": "finished",
                         "class": {"code": "AMB"}, "period": {"start": "2020-01-01"}}, patient="")
