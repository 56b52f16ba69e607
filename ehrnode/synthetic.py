"""Synthetic patients for the demo and tests: seeded, offline, valid FHIR R4.

A *person* is who exists in the world (name, birth date, sex, national id,
address, phone). Each institution that sees a person registers them under its
own medical record number and resource ids, so the same person recorded at two
hospitals yields two different Patient resources sharing only what a real
person shares: demographics and the national identifier. About a third of the
people are Chinese residents with an 18-digit resident identity card number
(valid GB 11643 check character) and an 11-digit mobile number.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Any

from .empi.identifiers import resident_id_check_char

_US_GIVEN = ["Olivia", "Liam", "Emma", "Noah", "Ava", "Mateo", "Sophia", "Elijah", "Isabella", "Lucas", "Mia",
             "Amara", "Ethan", "Harper", "Jonah", "Layla"]
_US_FAMILY = ["Okafor", "Lindqvist", "Hernandez", "Whitfield", "Nakamura", "Brennan", "Castellano", "Abernathy",
              "Kowalczyk", "Delacroix", "Fairbanks", "Montgomery"]
_CN_FAMILY = ["王", "李", "张", "刘", "陈", "杨", "赵", "黄", "周", "吴"]
_CN_GIVEN = ["伟", "芳", "娜", "秀英", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟"]
_US_PLACES = [("Boston", "MA", "02118"), ("Worcester", "MA", "01608"), ("Springfield", "MA", "01103"),
              ("Hartford", "CT", "06103"), ("Providence", "RI", "02903")]
_CN_PLACES = [("北京市", "朝阳区", "110105"), ("上海市", "浦东新区", "310115"), ("广东省", "天河区", "440106")]
_STREETS = ["Maple", "Harbor", "Chestnut", "Beacon", "Elm", "Summit", "Orchard"]
_CONDITIONS = [("44054006", "Diabetes mellitus type 2"), ("38341003", "Hypertensive disorder"),
               ("195662009", "Acute viral pharyngitis"), ("10509002", "Acute bronchitis"),
               ("55822004", "Hyperlipidemia")]
_CLASSES = [("AMB", "ambulatory"), ("EMER", "emergency"), ("IMP", "inpatient encounter")]


@dataclass(frozen=True)
class Person:
    key: int
    given: str
    family: str
    sex: str  # "male" | "female"
    birth_date: str
    national_system: str
    national_id: str
    phone: str
    line: str
    city: str
    state: str
    postal_code: str
    country: str


def people(count: int, seed: int = 0) -> list[Person]:
    rng = random.Random(seed)
    out = []
    for key in range(count):
        sex = rng.choice(["male", "female"])
        year, month, day = rng.randrange(1935, 2015), rng.randrange(1, 13), rng.randrange(1, 29)
        if key % 3 == 2:
            province, district, area = rng.choice(_CN_PLACES)
            sequence = rng.randrange(0, 100), rng.randrange(0, 5) * 2 + (sex == "male")
            first17 = f"{area}{year:04d}{month:02d}{day:02d}{sequence[0]:02d}{sequence[1]}"
            out.append(Person(
                key, rng.choice(_CN_GIVEN), rng.choice(_CN_FAMILY), sex, f"{year:04d}-{month:02d}-{day:02d}",
                "urn:oid:2.16.156.10011.1.1", first17 + resident_id_check_char(first17),
                f"1{rng.choice('3456789')}{rng.randrange(10**8, 10**9)}", f"{district}{rng.randrange(1, 300)}号",
                province, province, area, "CN",
            ))
        else:
            city, state, postal = rng.choice(_US_PLACES)
            out.append(Person(
                key, rng.choice(_US_GIVEN), rng.choice(_US_FAMILY), sex, f"{year:04d}-{month:02d}-{day:02d}",
                "http://hl7.org/fhir/sid/us-ssn",
                f"{rng.randrange(100, 900):03d}-{rng.randrange(10, 99):02d}-{rng.randrange(1000, 9999):04d}",
                f"{rng.randrange(200, 999)}-555-{rng.randrange(1000, 9999):04d}",
                f"{rng.randrange(1, 999)} {rng.choice(_STREETS)} Street", city, state, postal, "US",
            ))
    return out


def _id(institution: str, person: Person, what: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"ehrnode-synthetic/{institution}/{person.key}/{what}"))


def patient_resources(person: Person, institution: str, *, visits: int = 2, seed: int = 0) -> list[dict[str, Any]]:
    """The Patient and a few encounters, conditions and observations for ``person`` at ``institution``."""
    rng = random.Random(f"{seed}/{institution}/{person.key}")
    patient_id = _id(institution, person, "patient")
    name: dict[str, Any] = {"use": "official", "family": person.family, "given": [person.given]}
    if person.country == "CN":
        name["text"] = person.family + person.given
    patient: dict[str, Any] = {
        "resourceType": "Patient", "id": patient_id,
        "identifier": [
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
             "system": f"urn:ehrnode:{institution}:mrn", "value": f"{institution}-{rng.randrange(10**6, 10**7)}"},
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                  "code": "SS" if person.country == "US" else "NNCHN"}]},
             "system": person.national_system, "value": person.national_id},
        ],
        "name": [name],
        "telecom": [{"system": "phone", "value": person.phone, "use": "mobile" if person.country == "CN" else "home"}],
        "gender": person.sex, "birthDate": person.birth_date,
        "address": [{"line": [person.line], "city": person.city, "state": person.state,
                     "postalCode": person.postal_code, "country": person.country}],
    }
    out: list[dict[str, Any]] = [patient]
    for visit in range(visits):
        encounter_id = _id(institution, person, f"encounter-{visit}")
        code, display = rng.choice(_CLASSES)
        day = f"20{rng.randrange(18, 26)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
        hour = rng.randrange(8, 17)
        out.append({
            "resourceType": "Encounter", "id": encounter_id, "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": code, "display": display},
            "subject": {"reference": f"Patient/{patient_id}"},
            "period": {"start": f"{day}T{hour:02d}:00:00+08:00", "end": f"{day}T{hour:02d}:40:00+08:00"},
        })
        snomed, text = rng.choice(_CONDITIONS)
        out.append({
            "resourceType": "Condition", "id": _id(institution, person, f"condition-{visit}"),
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                           "code": "active"}]},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": snomed, "display": text}], "text": text},
            "subject": {"reference": f"Patient/{patient_id}"}, "encounter": {"reference": f"Encounter/{encounter_id}"},
            "onsetDateTime": f"{day}T{hour:02d}:10:00+08:00",
        })
        out.append({
            "resourceType": "Observation", "id": _id(institution, person, f"observation-{visit}"),
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
            "subject": {"reference": f"Patient/{patient_id}"}, "encounter": {"reference": f"Encounter/{encounter_id}"},
            "effectiveDateTime": f"{day}T{hour:02d}:05:00+08:00",
            "valueQuantity": {"value": rng.randrange(55, 110), "unit": "/min", "system": "http://unitsofmeasure.org",
                              "code": "/min"},
        })
    return out


def bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    """A collection Bundle of ``resources``."""
    return {
        "resourceType": "Bundle", "type": "collection",
        "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources],
    }
