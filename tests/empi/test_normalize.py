"""Normalization of FHIR Patients and FEBRL rows (ehrnode/empi/normalize.py)."""

from __future__ import annotations

import json

import pytest

from ehrnode.empi.normalize import (
    FEBRL_ID_SCHEME,
    Demographics,
    normalize_date,
    normalize_name,
    normalize_phone,
    split_name_text,
)
from ehrnode.errors import FhirError

from ..datasets import SYNTHEA

PATIENTS = SYNTHEA / "Patient.ndjson"
#: Valid resident id numbers (GB 11643-1999): born 1949-12-31, female; born 1980-01-01, male.
ID_FEMALE_1949 = "11010519491231002X"
ID_MALE_1980 = "110105198001010016"


def patient(**fields) -> dict:
    return {"resourceType": "Patient", "id": "p1", **fields}


def resident_id(value: str) -> list[dict]:
    return [{"system": "urn:oid:2.16.156.10011.1.1", "value": value}]


# -- names -----------------------------------------------------------------------------

def test_latin_names_are_casefolded_without_accents_or_punctuation():
    assert normalize_name("  José-María  ") == "jose maria"
    assert normalize_name("O'Keefe") == "okeefe"
    assert normalize_name("Ñúñez") == "nunez"
    assert normalize_name("STRAßE") == "strasse"
    assert normalize_name("Ｊｏｈｎ") == "john"          # full-width forms fold to ASCII


def test_digits_in_names_are_dropped():
    assert normalize_name("Sumiko254") == "sumiko"
    assert normalize_name("O'Keefe54") == "okeefe"


def test_chinese_names_keep_their_characters():
    demo = Demographics.from_fhir(patient(name=[{"family": "张", "given": ["小", "明"]}]))
    assert (demo.given, demo.family) == ("小明", "张")
    assert normalize_name("王 伟") == "王 伟"


def test_name_given_only_as_text_is_split():
    assert split_name_text("欧阳娜娜") == ("娜娜", "欧阳")
    assert split_name_text("张伟") == ("伟", "张")
    assert split_name_text("Smith, John") == ("john", "smith")
    assert split_name_text("John Smith") == ("john", "smith")
    demo = Demographics.from_fhir(patient(name=[{"text": "李小龙"}]))
    assert (demo.given, demo.family) == ("小龙", "李")


def test_official_name_is_preferred_to_the_maiden_name():
    demo = Demographics.from_fhir(patient(name=[
        {"use": "maiden", "family": "Cummerata161", "given": ["Sumiko254"]},
        {"use": "official", "family": "Medhurst46", "given": ["Sumiko254", "Larue605"]},
    ]))
    assert (demo.given, demo.family) == ("sumiko", "medhurst")


def test_a_patient_without_names_is_kept_with_a_warning():
    demo = Demographics.from_fhir(patient(birthDate="1990-01-02"))
    assert (demo.given, demo.family) == ("", "")
    assert "name_missing" in demo.warnings
    assert demo.birth_date == "19900102"


def test_only_a_patient_resource_is_accepted():
    with pytest.raises(FhirError):
        Demographics.from_fhir({"resourceType": "Observation"})
    with pytest.raises(FhirError):
        Demographics.from_fhir(["not", "a", "resource"])  # type: ignore[arg-type]


# -- dates -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("1927-05-21", "19270521"),
    ("19270521", "19270521"),
    ("2000-02-29", "20000229"),      # leap year
    ("1900-02-29", None),            # not a leap year
    ("1990-02-30", None),
    ("1990-13-01", None),
    ("1990-00-10", None),
    ("1799-12-31", None),            # before 1800: not a living patient's
    ("1990-1-2", None),
    ("", None),
])
def test_dates_are_validated(text, expected):
    assert normalize_date(text) == expected


def test_impossible_and_partial_birth_dates_fall_back_to_unknown_with_a_warning():
    impossible = Demographics.from_fhir(patient(birthDate="1990-02-30"))
    assert impossible.birth_date is None and impossible.warnings == ("name_missing", "birth_date_invalid")
    partial = Demographics.from_fhir(patient(birthDate="1990-04"))
    assert partial.birth_date is None and "birth_date_partial" in partial.warnings
    febrl = Demographics.from_febrl({"rec_id": "rec-1-org", "date_of_birth": "19231310"})
    assert febrl.birth_date is None and "birth_date_invalid" in febrl.warnings


# -- phones ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, country, expected", [
    ("555-810-7203", "", "5558107203"),
    ("+1 (555) 810-7203", "", "5558107203"),
    ("001 555 810 7203", "", "5558107203"),
    ("1-555-810-7203", "US", "5558107203"),
    ("555-810-7203 x12", "", "5558107203"),
    ("+86 138 0013 8000", "", "13800138000"),
    ("0086 13800138000", "", "13800138000"),
    ("138-0013-8000", "", "13800138000"),
    ("１３８００１３８０００", "", "13800138000"),    # full-width digits
    ("+86 10 6552 9988", "", "1065529988"),
    ("010-6552-9988", "CN", "1065529988"),         # the trunk 0 goes in China
    ("+44 20 7946 0958", "", "442079460958"),      # other countries keep their code
    ("12345", "", None),
    ("call me", "", None),
])
def test_phones_normalize_to_national_digits(text, country, expected):
    assert normalize_phone(text, country=country) == expected


def test_an_unreadable_phone_is_dropped_with_a_warning():
    demo = Demographics.from_fhir(patient(telecom=[{"system": "phone", "value": "n/a"}]))
    assert demo.phone == "" and "phone_invalid" in demo.warnings


def test_a_mobile_number_is_preferred_and_email_ignored():
    demo = Demographics.from_fhir(patient(telecom=[
        {"system": "email", "value": "a@example.org"},
        {"system": "phone", "use": "home", "value": "555-810-7203"},
        {"system": "phone", "use": "mobile", "value": "+86 13800138000"},
    ]))
    assert demo.phone == "13800138000"


# -- national identifiers -------------------------------------------------------------

def test_resident_id_fills_in_birth_date_and_sex():
    demo = Demographics.from_fhir(patient(identifier=resident_id(ID_FEMALE_1949.lower())))
    assert demo.national_id == ("cn-resident-id", ID_FEMALE_1949)
    assert (demo.birth_date, demo.sex) == ("19491231", "f")


def test_resident_id_agreeing_with_the_record_is_trusted():
    demo = Demographics.from_fhir(patient(identifier=resident_id(ID_MALE_1980), birthDate="1980-01-01", gender="male"))
    assert demo.national_id == ("cn-resident-id", ID_MALE_1980)
    assert demo.warnings == ("name_missing",)


def test_resident_id_with_another_birth_date_is_not_trusted():
    demo = Demographics.from_fhir(patient(identifier=resident_id(ID_MALE_1980), birthDate="1980-01-02", gender="male"))
    assert demo.national_id is None
    assert "resident_id_birth_date_mismatch" in demo.warnings
    assert demo.birth_date == "19800102"       # the record's own value stands


def test_resident_id_with_another_sex_is_not_trusted():
    demo = Demographics.from_fhir(patient(identifier=resident_id(ID_MALE_1980), gender="female"))
    assert demo.national_id is None
    assert "resident_id_sex_mismatch" in demo.warnings


def test_resident_id_with_a_bad_check_character_is_reported_and_ignored():
    bad = ID_MALE_1980[:-1] + "7"
    demo = Demographics.from_fhir(patient(identifier=resident_id(bad)))
    assert demo.national_id is None
    assert "national_id_invalid:cn-resident-id" in demo.warnings


def test_resident_id_with_an_impossible_birth_date_is_not_trusted():
    from ehrnode.empi.identifiers import resident_id_check_char
    first17 = "11010519900230001"                  # 30 February
    demo = Demographics.from_fhir(patient(identifier=resident_id(first17 + resident_id_check_char(first17))))
    assert demo.national_id is None
    assert "resident_id_birth_date_invalid" in demo.warnings


# -- addresses and sources -----------------------------------------------------------

def test_fhir_address_is_split_into_number_street_and_area():
    demo = Demographics.from_fhir(patient(address=[
        {"use": "old", "line": ["1 Old Road"], "city": "Elsewhere"},
        {"use": "home", "line": ["318 Harber Viaduct Unit 33", "Building B"], "city": "Cunningham",
         "state": "KS", "postalCode": "67035"},
    ]))
    assert (demo.street_number, demo.street, demo.address_extra) == ("318", "harber viaduct unit 33", "building b")
    assert (demo.locality, demo.state, demo.postcode) == ("cunningham", "ks", "67035")


def test_febrl_rows_are_read_with_or_without_the_national_id():
    row = {"rec_id": "rec-552-dup-0", "given_name": " harley", "surname": "mccarthy", "street_number": "177",
           "address_1": "pridham tstreet", "address_2": "milton", "suburb": "marsden", "postcode": "3165",
           "state": "nsw", "date_of_birth": "19080419", "soc_sec_id": "6089216"}
    demo = Demographics.from_febrl(row)
    assert demo == Demographics(
        given="harley", family="mccarthy", birth_date="19080419", street_number="177", street="pridham tstreet",
        address_extra="milton", locality="marsden", postcode="3165", state="nsw",
        national_id=(FEBRL_ID_SCHEME, "6089216"))
    assert Demographics.from_febrl(row, national_id=False).national_id is None


def test_every_synthea_patient_normalizes_cleanly():
    patients = [json.loads(line) for line in PATIENTS.read_text().splitlines()]
    assert len(patients) == 12
    for p in patients:
        demo = Demographics.from_fhir(p)
        assert demo.warnings == ()
        assert demo.given.isalpha() and demo.family.isalpha()
        assert demo.birth_date and demo.sex in ("m", "f") and len(demo.phone) == 10
        assert demo.national_id is not None and demo.national_id[0] == "us-ssn"
