"""Scoring, classification and the blocking index (ehrnode/empi/matching.py)."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import random
import time

import pytest

from ehrnode.empi import matching
from ehrnode.empi.encoding import FIELDS, Encoder, Encodings
from ehrnode.empi.matching import Index, blocking_keys, classify, match_grade, score
from ehrnode.empi.normalize import Demographics

from ..datasets import FEBRL, SYNTHEA

KEY = bytes(range(32))

SUMIKO = Demographics(
    given="sumiko", family="medhurst", birth_date="19270521", sex="f", street_number="633",
    street="abernathy landing", locality="emporia", postcode="66801", state="ks", phone="5558107203",
)
#: Another woman born the same day in the same town (as in the Synthea sample).
MARINE = dataclasses.replace(SUMIKO, given="marine", family="upton", street_number="738", street="greenholt rapid",
                             phone="5559238160")


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(KEY, oprf_key=0x5EED)


def linked(encoder: Encoder, a: Demographics, b: Demographics) -> matching.Score:
    return score(encoder.encode(a), encoder.encode(b))


# -- the model -----------------------------------------------------------------------

def test_model_is_well_formed():
    assert [m.name for m in matching.MODEL] == [spec.name for spec in FIELDS]
    for m in matching.MODEL:
        assert list(m.bands) == sorted(set(m.bands)) and all(0 < b <= 1000 for b in m.bands)
        assert len(m.weights) == len(m.bands) + 1
        assert list(m.weights) == sorted(m.weights), f"{m.name}: a closer agreement must not weigh less"
        assert m.weights[0] < 0 < m.weights[-1]
    assert matching.LOWER < matching.UPPER < matching.CERTAIN
    assert matching.NATIONAL_ID_DIFFERENT < 0 and matching.SEX_WEIGHTS[1] < 0 < matching.SEX_WEIGHTS[0]


# -- what should link, and what should not -------------------------------------------

@pytest.mark.parametrize("change", [
    {"family": "medhrst"},                                       # typo in the family name
    {"family": "medhurts", "given": "sumko"},                    # typos in both names
    {"given": "medhurst", "family": "sumiko"},                   # given and family swapped
    {"phone": "5550001111"},                                     # a new phone number
    {"phone": ""},                                               # no phone at all
    {"street_number": "12", "street": "main street", "phone": "5550001111"},  # moved within town
    {"birth_date": "19270512"},                                  # day and month digits mistyped
])
def test_the_same_person_with_errors_links(encoder, change):
    s = linked(encoder, SUMIKO, dataclasses.replace(SUMIKO, **change))
    assert classify(s) == "link", (s.total, s.fields)
    assert match_grade(s) in ("certain", "probable")


def test_swapped_names_are_flagged_and_cost_a_little(encoder):
    straight = linked(encoder, SUMIKO, SUMIKO)
    swapped = linked(encoder, SUMIKO, dataclasses.replace(SUMIKO, given="medhurst", family="sumiko"))
    assert swapped.names_swapped and not straight.names_swapped
    assert swapped.total == straight.total - matching.SWAP_PENALTY


def test_different_people_born_the_same_day_in_the_same_town_do_not_link(encoder):
    s = linked(encoder, SUMIKO, MARINE)
    assert classify(s) != "link"
    assert match_grade(s) != "certain"


def test_different_people_do_not_link(encoder):
    other = Demographics(given="devin", family="cole", birth_date="19600413", sex="m", street_number="319",
                         street="hahn dam", locality="haysville", postcode="67216", state="ks", phone="5554788993")
    s = linked(encoder, SUMIKO, other)
    assert classify(s) == "new" and match_grade(s) is None


def test_equal_national_id_is_a_certain_match_whatever_the_rest(encoder):
    a = dataclasses.replace(SUMIKO, national_id=("us-ssn", "999945397"))
    b = dataclasses.replace(MARINE, national_id=("us-ssn", "999945397"), birth_date="19800101")
    s = linked(encoder, a, b)
    assert s.national_id == "same" and classify(s) == "link" and match_grade(s) == "certain"


def test_different_national_ids_weigh_against(encoder):
    a = dataclasses.replace(SUMIKO, national_id=("us-ssn", "999945397"))
    b = dataclasses.replace(MARINE, national_id=("us-ssn", "999277392"))
    s = linked(encoder, a, b)
    assert s.national_id == "different" and s.national_id_weight == matching.NATIONAL_ID_DIFFERENT
    assert classify(s) == "new"


def test_different_sex_weighs_against(encoder):
    same = linked(encoder, SUMIKO, SUMIKO)
    other = linked(encoder, SUMIKO, dataclasses.replace(SUMIKO, sex="m"))
    assert same.total - other.total == matching.SEX_WEIGHTS[0] - matching.SEX_WEIGHTS[1]


def test_area_agreement_counts_once(encoder):
    s = linked(encoder, SUMIKO, SUMIKO)
    area = {e.field: e for e in s.fields if e.field in ("locality", "postcode", "state")}
    assert sorted(e.counted for e in area.values())[:2] == [0, 0]
    assert max(e.counted for e in area.values()) == max(e.weight for e in area.values())


def test_dwelling_agreement_counts_once(encoder):
    other_line = dataclasses.replace(SUMIKO, address_extra="unit 4")
    s = linked(encoder, other_line, other_line)
    dwelling = {e.field: e for e in s.fields if e.field in ("street_number", "street", "address_extra", "phone")}
    assert all(e.weight > 0 for e in dwelling.values())
    assert sorted(e.counted for e in dwelling.values())[:2] == [0, 0]
    assert max(e.counted for e in dwelling.values()) == max(e.weight for e in dwelling.values())


def test_someone_else_at_the_same_address_does_not_link(encoder):
    """A household: one dwelling, another person (other names, birth date and sex)."""
    husband = dataclasses.replace(SUMIKO, given="harold", family="baxter", birth_date="19250302", sex="m",
                                  address_extra="unit 4")
    s = linked(encoder, dataclasses.replace(SUMIKO, address_extra="unit 4"), husband)
    assert classify(s) == "new", (s.total, s.fields)


#: Her daughter, living with her: the family name, address and phone are hers too.
DAUGHTER = dataclasses.replace(SUMIKO, given="dorothy", birth_date="19530814")


def test_a_housemate_with_the_family_name_is_reviewed_not_linked(encoder):
    s = linked(encoder, SUMIKO, DAUGHTER)
    assert s.household and s.total >= matching.UPPER     # the address and the name outweigh the rest
    assert classify(s) == "review" and match_grade(s) == "possible"


def test_the_same_person_at_the_same_address_is_not_a_household(encoder):
    s = linked(encoder, SUMIKO, dataclasses.replace(SUMIKO, given="sumko"))
    assert not s.household and classify(s) == "link"


def test_a_link_ranks_before_a_household_pair_that_scores_higher(encoder):
    index = Index()
    # The daughter's own record elsewhere: after a move, with a typo in each name.
    elsewhere = dataclasses.replace(DAUGHTER, given="dorthy", family="medhrust", street_number="12",
                                    street="harbour view road", locality="fremantle", postcode="6160", state="wa",
                                    phone="0893351122")
    index.add("mother", encoder.encode(SUMIKO))
    index.add("daughter", encoder.encode(elsewhere))
    enc = encoder.encode(DAUGHTER)
    assert score(enc, index.get("mother")).total > score(enc, index.get("daughter")).total
    (best, s), (second, t) = index.ranked(enc)
    assert (best, classify(s)) == ("daughter", "link") and (second, classify(t)) == ("mother", "review")


#: The same woman, registered elsewhere after a move to another state, with a typo in each name.
MOVED_SUMIKO = dataclasses.replace(SUMIKO, given="sumikko", family="medhrust", street_number="12",
                                   street="harbour view road", address_extra="flat 2", locality="fremantle",
                                   postcode="6160", state="wa", phone="0893351122")


def test_a_patient_who_moved_links_as_one_move(encoder):
    s = linked(encoder, SUMIKO, MOVED_SUMIKO)
    assert s.moved and s.moved_weight == matching.MOVED
    assert classify(s) == "link", (s.total, s.fields)
    place = [e for e in s.fields if e.field not in ("given", "family", "birth_date")]
    assert place and all(e.counted == 0 and e.weight < 0 for e in place if e.dice is not None)
    person = sum(e.counted for e in s.fields if e.field in ("given", "family", "birth_date"))
    assert s.total == person + s.sex_weight + matching.MOVED


def test_a_moved_pair_is_probable_at_most(encoder):
    s = linked(encoder, SUMIKO, dataclasses.replace(MOVED_SUMIKO, given="sumiko", family="medhurst"))
    assert s.moved and s.total >= matching.CERTAIN
    assert classify(s) == "link" and match_grade(s) == "probable"


@pytest.mark.parametrize("unknown", ["given", "birth_date"])
def test_certain_on_demographics_needs_the_given_name_and_birth_date(encoder, unknown):
    """A record without them at a relative's address scores high on the family name and place."""
    s = linked(encoder, SUMIKO, dataclasses.replace(DAUGHTER, **{unknown: ""}))
    assert s.total >= matching.CERTAIN and not s.household
    assert match_grade(s) == "probable"
    assert match_grade(linked(encoder, SUMIKO, SUMIKO)) == "certain"


@pytest.mark.parametrize("change", [
    {"sex": ""},                              # the sex unknown on one side
    {"sex": "m"},                             # a different sex
    {"birth_date": "19270512"},               # a birth date off by a typo
    {"given": "harold"},                      # another given name
])
def test_the_moved_reading_needs_every_person_field_to_agree(encoder, change):
    s = linked(encoder, SUMIKO, dataclasses.replace(MOVED_SUMIKO, **change))
    assert not s.moved and s.moved_weight == 0
    assert classify(s) != "link", (s.total, s.fields)


def test_unknown_fields_weigh_nothing(encoder):
    s = linked(encoder, SUMIKO, Demographics(given="sumiko", family="medhurst"))
    unknown = [e for e in s.fields if e.field not in ("given", "family")]
    assert all(e.dice is None and e.level is None and e.counted == 0 for e in unknown)


# -- determinism ------------------------------------------------------------------------

def test_score_is_symmetric_and_adds_up(encoder):
    people = [SUMIKO, MARINE, dataclasses.replace(SUMIKO, given="medhurst", family="sumko"),
              Demographics(given="medhurst", family="marine"), Demographics(family="upton", birth_date="19270521")]
    encs = [encoder.encode(p) for p in people]
    for a in encs:
        for b in encs:
            s, t = score(a, b), score(b, a)
            assert s.total == t.total and s.names_swapped == t.names_swapped
            assert s.total == (sum(e.counted for e in s.fields) + s.sex_weight + s.national_id_weight + s.swap_weight
                               + s.moved_weight)


def test_index_answers_do_not_depend_on_insertion_order(encoder):
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    rows = _febrl("dataset1.csv")[:300]
    encs = {f"e{i:04d}": encoder.encode(Demographics.from_febrl(r, national_id=False)) for i, r in enumerate(rows)}
    ids = sorted(encs)
    shuffled = ids[:]
    rng.shuffle(shuffled)
    first, second = Index(), Index()
    for eid in ids:
        first.add(eid, encs[eid])
    for eid in shuffled:
        second.add(eid, encs[eid])
    for eid in ids[:100]:
        assert first.candidates(encs[eid]) == second.candidates(encs[eid])
        assert first.ranked(encs[eid]) == second.ranked(encs[eid])


def test_candidates_are_sorted_and_the_ranking_puts_the_national_id_first(encoder):
    index = Index()
    with_id = dataclasses.replace(MARINE, national_id=("us-ssn", "999945397"))
    index.add("b", encoder.encode(SUMIKO))
    index.add("a", encoder.encode(with_id))
    query = encoder.encode(dataclasses.replace(SUMIKO, national_id=("us-ssn", "999945397")))
    assert index.candidates(query) == ["a", "b"]
    assert [cid for cid, _ in index.ranked(query)] == ["a", "b"]


def test_index_refuses_a_second_enrolment_under_one_id(encoder):
    index = Index()
    index.add("a", encoder.encode(SUMIKO))
    with pytest.raises(ValueError):
        index.add("a", encoder.encode(MARINE))


def test_oversized_demographic_blocks_are_skipped_but_national_id_blocks_never(encoder, monkeypatch):
    monkeypatch.setattr(matching, "MAX_BLOCK", 3)
    index = Index()
    for i in range(4):           # four enrolments sharing every demographic blocking key
        index.add(f"e{i}", encoder.encode(dataclasses.replace(SUMIKO, national_id=("us-ssn", f"99900000{i}"))))
    assert index.candidates(encoder.encode(SUMIKO)) == []
    found = index.candidates(encoder.encode(dataclasses.replace(SUMIKO, national_id=("us-ssn", "999000002"))))
    assert found == ["e2"]


def test_candidates_are_bounded_smallest_blocks_first():
    national = b"n" * 16
    sizes = {b"a" * 8: 300, b"b" * 8: 150, b"c" * 8: 150, b"d" * 8: 1001, national: 5000}
    # 150 + 150 taken (ties by key), 300 more would pass MAX_CANDIDATES; the national id always counts.
    assert matching.usable_blocks(sizes) == sorted([b"b" * 8, b"c" * 8, national])
    crafted = {bytes([i]) * 8: 1000 for i in range(16)}
    assert matching.usable_blocks(crafted) == []
    assert matching.usable_blocks({}) == []


def test_blocking_keys_include_the_national_id(encoder):
    enc = encoder.encode(dataclasses.replace(SUMIKO, national_id=("us-ssn", "999945397")))
    keys = blocking_keys(enc)
    assert keys == sorted(keys) and enc.national_id in keys
    assert set(keys) - {enc.national_id} == set(enc.blocking)


# -- data sets -----------------------------------------------------------------------------

def _febrl(name: str) -> list[dict[str, str]]:
    with open(FEBRL / name, newline="") as fh:
        return list(csv.DictReader(fh, skipinitialspace=True))


def test_febrl_dedup_quality_floor_without_national_id(encoder):
    rows = _febrl("dataset1.csv")
    people = [r["rec_id"].split("-")[1] for r in rows]
    index, linked_pairs, candidate_pairs = Index(), set(), set()
    start = time.perf_counter()
    for i, row in enumerate(rows):
        enc = encoder.encode(Demographics.from_febrl(row, national_id=False))
        for cid, s in index.ranked(enc):
            candidate_pairs.add((int(cid), i))
            if classify(s) == "link":
                linked_pairs.add((int(cid), i))
        index.add(f"{i:06d}", enc)
    seconds = time.perf_counter() - start
    true = {(i, j) for i in range(len(rows)) for j in range(i + 1, len(rows)) if people[i] == people[j]}
    tp = len(linked_pairs & true)
    precision, recall = tp / len(linked_pairs), tp / len(true)
    f1 = 2 * precision * recall / (precision + recall)
    print(f"precision {precision:.4f} recall {recall:.4f} F1 {f1:.4f} candidates {len(candidate_pairs)} "
          f"in {seconds:.2f} s")
    assert f1 >= 0.99
    assert len(candidate_pairs & true) / len(true) >= 0.995
    assert len(candidate_pairs) <= 0.02 * len(rows) * (len(rows) - 1) / 2


def _synthea() -> list[dict]:
    return [json.loads(line) for line in (SYNTHEA / "Patient.ndjson").read_text().splitlines()]


def _second_registration(patient: dict, rng: random.Random) -> dict:
    """The patient as another hospital registers them: no identifiers, a typo in the
    family name, given and family swapped, another phone number."""
    copy_ = copy.deepcopy(patient)
    copy_["id"] = "other-" + patient["id"]
    copy_.pop("identifier", None)
    name = next(n for n in copy_["name"] if n.get("use") == "official")
    family = name["family"]
    cut = rng.randrange(1, len(family) - 1)
    typo = family[:cut] + family[cut + 1:]
    name["family"], name["given"] = name["given"][0], [typo] + name["given"][1:]
    copy_["telecom"] = [{"system": "phone", "value": f"555-{rng.randrange(100, 999)}-{rng.randrange(1000, 9999)}"}]
    return copy_


def test_synthea_patients_registered_at_two_hospitals_link_to_themselves_only(encoder):
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    patients = _synthea()
    index = Index()
    for p in patients:
        index.add(p["id"], encoder.encode(Demographics.from_fhir(p)))
    for p in patients:
        enc = encoder.encode(Demographics.from_fhir(_second_registration(p, rng)))
        assert enc.national_id is None
        ranked = index.ranked(enc)
        best_id, best = ranked[0]
        assert best_id == p["id"] and classify(best) == "link" and best.names_swapped
        assert all(classify(s) != "link" for _, s in ranked[1:]), [(c, s.total) for c, s in ranked]


def test_synthea_patients_with_their_national_ids_are_certain(encoder):
    patients = _synthea()
    index = Index()
    for p in patients:
        index.add(p["id"], encoder.encode(Demographics.from_fhir(p)))
    for p in patients:
        again = copy.deepcopy(p)
        again["telecom"] = []
        ranked = index.ranked(encoder.encode(Demographics.from_fhir(again)))
        assert ranked[0][0] == p["id"] and match_grade(ranked[0][1]) == "certain"
        assert all(classify(s) == "new" for _, s in ranked[1:])


def test_wire_encodings_score_like_the_originals(encoder):
    a, b = encoder.encode(SUMIKO), encoder.encode(MARINE)
    again = Encodings.from_wire(a.to_wire()), Encodings.from_wire(b.to_wire())
    assert score(*again) == score(a, b)
