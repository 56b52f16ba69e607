"""The notes scrubber (ehrnode/records/deid/notes.py): the forms identifiers take in notes, and
quality floors on the shipped Synthea notes and a seeded generated set."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest

from ehrnode import synthetic_notes
from ehrnode.records.deid.measure import measure, synthea_truth
from ehrnode.records.deid.notes import PatientFacts, scrub_note

from ..datasets import SYNTHEA

OFFSET = -30
PATIENT = {
    "resourceType": "Patient", "id": "p", "name": [{"family": "Larue605", "given": ["Sumiko254"]},
                                                   {"use": "maiden", "family": "Cummerata161", "given": ["Sumiko254"]}],
    "telecom": [{"system": "phone", "value": "555-810-7203"}],
    "address": [{"line": ["633 Abernathy Landing Unit 4"], "city": "Emporia", "postalCode": "66801"}],
    "identifier": [{"value": "999-94-5397"}, {"value": "S99940903"}],
    "contact": [{"name": {"family": "王", "given": ["小明"]}}],
}
FACTS = PatientFacts.of(PATIENT)


@pytest.mark.parametrize("text, gone, kept", [
    ("Sumiko254 Larue605 is a 61 year-old.", ["Sumiko", "Larue"], ["61 year-old"]),
    ("LARUE, Sumiko and sumiko larue and S. Larue and S.L.", ["LARUE", "Sumiko", "sumiko", "S. Larue", "S.L."], []),
    ("Her mother, née Cummerata, called.", ["Cummerata"], ["mother"]),
    ("Contact 王小明 (Wang Xiaoming, xiaoming wang) today.", ["王小明", "Wang Xiaoming", "xiaoming wang"], ["today"]),
    ("Call 555.810.7203 or (555) 810-7203.", ["810"], ["Call"]),
    ("Lives at 633 Abernathy Landing, Emporia, KS 66801.", ["Abernathy", "Emporia", "66801"], ["Lives"]),
    ("SSN 999 94 5397, DL S99940903.", ["5397", "S99940903"], ["SSN", "DL"]),
], ids=["synthea-digits", "forms", "maiden", "pinyin", "phone", "address", "ids"])
def test_the_patients_own_identifiers_go_in_every_form(text, gone, kept):
    out = scrub_note(text, FACTS, OFFSET).text
    for value in gone:
        assert value not in out, out
    for value in kept:
        assert value in out, out


@pytest.mark.parametrize("text, expected", [
    ("seen 2021-03-04 and 3/4/2021", "seen 2021-02-02 and 2/2/2021"),
    ("March 4, 2021; 4 Mar 2021; March 2021", "February 2, 2021; 2 Feb 2021; February 2021"),
    ("2021年3月4日入院，3月4日出院", "2021年2月2日入院，2月2日出院"),
    ("二〇二一年三月四日复诊", "二〇二一年二月二日复诊"),
    ("on 03/04/21", "on 02/02/21"),
])
def test_dates_move_by_the_patients_offset_in_their_own_form(text, expected):
    assert scrub_note(text, None, OFFSET).text == expected


@pytest.mark.parametrize("text, expected", [
    ("Age: 95.", "Age: 90+."), ("a 95 y.o. man", "a 90+ y.o. man"), ("a 96-year-old woman", "a 90+-year-old woman"),
    ("患者九十二岁", "患者90+岁"), ("年龄：92岁", "年龄：90+岁"), ("aged 101", "aged 90+"),
    ("a 61 year-old", "a 61 year-old"), ("BP 95/60", "BP 95/60"),
])
def test_ages_over_89_become_90_plus_and_other_numbers_stay(text, expected):
    assert scrub_note(text, None, OFFSET).text == expected


@pytest.mark.parametrize("text, gone", [
    ("Lives at 12 Maple Street, Apt 4B.", "12 Maple"), ("ZIP 02118.", "02118"), ("Boston, MA 02118", "02118"),
    ("Call 867-5309.", "867-5309"), ("座机0755 8888 6666。", "8888"), ("手机138 1234 5678。", "1234"),
    ("身份证 110105 19491231 002X。", "002X"), ("身份证11010519491231002X。", "002X"),
    ("住址：广东省深圳市南山区科技园路18号。", "科技园路"), ("email jane@example.org", "jane@"),
    ("Portal https://portal.example.org/p/1", "portal.example"), ("MRN: 7766554", "7766554"),
    ("病历号：A1234567", "A1234567"),
])
def test_identifying_patterns_go(text, gone):
    out = scrub_note(text, None, OFFSET).text
    assert gone not in out, out


@pytest.mark.parametrize("text, gone", [
    ("Seen by Dr. Alvarez and Nurse Patel.", ["Alvarez", "Patel"]),
    ("Discussed with Jennifer Wilson.", ["Jennifer Wilson"]), ("由李医生查房。", ["李"]),
    ("王小明护士测血压。", ["王小明"]), ("家属：张丽娟，电话已留。", ["张丽娟"]),
])
def test_other_peoples_names_go_by_title_and_dictionary(text, gone):
    out = scrub_note(text, None, OFFSET).text
    for value in gone:
        assert value not in out, out


def test_clinical_text_stays():
    text = ("Started metformin 500 mg twice daily. Hemoglobin A1c 7.8%. BP 130/85, HR 72. Follow up in 3 months. "
            "予阿司匹林100mg口服，每日一次。双肺呼吸音清。")
    assert scrub_note(text, FACTS, OFFSET).text == text


def _synthea_triples():
    patients = {p["id"]: p for p in map(json.loads, (SYNTHEA / "Patient.ndjson").read_text().splitlines())}
    for line in (SYNTHEA / "DocumentReference.ndjson").read_text().splitlines():
        document = json.loads(line)
        patient = patients[document["subject"]["reference"].split("/", 1)[1]]
        text = base64.b64decode(document["content"][0]["attachment"]["data"]).decode()
        yield text, patient, synthea_truth(text, patient)


def test_every_known_identifier_in_every_shipped_synthea_note_is_caught():
    score = measure(_synthea_triples())
    print(score.view())
    assert score.identifiers > 1000
    assert score.recall == 1.0, score.examples
    assert score.kept >= 0.95


def test_generated_notes_in_english_and_chinese_meet_the_recall_floor():
    notes = synthetic_notes.notes(400, seed=20261205)
    score = measure((n.text, n.patient, n.planted) for n in notes)
    print(score.view())
    assert {n.language for n in notes} == {"en", "zh"} and score.identifiers > 4000
    assert score.recall >= 0.995, score.examples
    assert score.kept >= 0.95


def test_deid_check_reports_what_the_notes_profile_releases(tmp_path):
    patient = (SYNTHEA / "Patient.ndjson").read_text().splitlines()[0]
    pid = json.loads(patient)["id"]
    notes = [line for line in (SYNTHEA / "DocumentReference.ndjson").read_text().splitlines() if pid in line][:3]
    path = tmp_path / "sample.ndjson"
    path.write_text(patient + "\n" + "\n".join(notes) + "\n")
    run = subprocess.run([sys.executable, "-m", "ehrnode.cli", "deid", "check", str(path), "--profile", "notes",
                          "--json"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["summary"]["resources"] == 4 and report["summary"]["profile"] == "notes"
    assert report["summary"]["found_in_text"]["name"] >= 3 and report["summary"]["found_in_text"]["date"] >= 3
    assert "Patient.name" in report["summary"]["removed"]
    released = json.dumps([r["released"] for r in report["resources"]])
    assert "Sumiko" not in released and "Larue" not in released
    plain = subprocess.run([sys.executable, "-m", "ehrnode.cli", "deid", "check", str(path), "--summary"],
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and "removed:" in plain.stdout and "DocumentReference.content" in plain.stdout
