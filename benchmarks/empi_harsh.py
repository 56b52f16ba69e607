"""EMPI matching on harsher data than FEBRL's: a second institution where patients moved to another
state, have typos in both names, or are registered under a married name, and where people who
live with a patient of the first register too.

The generator (seeded) makes a population with names drawn from the FEBRL originals (real
Australian frequency tables, so common names recur as they do in life), a sex, a birth date and
an address. Institution A registers every person as they are. Institution B registers half of
them again, each in one of these ways, and as many other people who are not at A:

* ``typos_moved``: one typo in the given name and one in the family name (a substitution,
  insertion, deletion or transposition, as FEBRL corrupts), and a new address in another state
  and a new phone: only the birth date, the sex and fuzzy names agree;
* ``typos``: typos in both names, same address;
* ``married``: a woman registered under another family name, without her maiden name, who
  moved too: only the given name, the birth date and the sex agree.

B also registers, for a fifth as many, a **housemate** of someone at A: the same address and
phone, another given name, birth date and sex, and the family name four times in five (a
spouse, a parent, a child). They must not link: that would merge two patients' records.

Each B record is encoded and looked up among A's enrolments as an enrolment is. Reported per
kind: automatic recall (pairs linked), pairs sent to review; for people not at A and for
housemates, how many linked to someone; and the precision of automatic links, over all of B
and without the housemates. The aim for the kinds where the birth date, sex and fuzzy names agree
(``typos_moved``, ``typos``): recall >= 0.97 at precision 1.0 with <= 5% to review.

    python benchmarks/empi_harsh.py [--people 5000] [--seed 1] [--json]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import random
import string
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ehrnode.empi import matching
from ehrnode.empi.encoding import Encoder
from ehrnode.empi.normalize import Demographics

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "febrl"
KINDS = ("typos_moved", "typos", "married")
#: Records at B of someone else living with a person at A: not the same patient.
HOUSEHOLD = "household"
KEY = bytes(range(32))
OPRF_KEY = 0x5EED


def _originals() -> list[dict[str, str]]:
    rows = []
    for name in ("dataset1.csv", "dataset2.csv", "dataset3.csv"):
        with open(DATA / name, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f, skipinitialspace=True):
                row = {k.strip(): (v or "").strip() for k, v in row.items()}
                if row["rec_id"].endswith("-org") and row["given_name"] and row["surname"]:
                    rows.append(row)
    return rows


def typo(rng: random.Random, word: str) -> str:
    """One FEBRL-style typo: a substitution, insertion, deletion or transposition."""
    if len(word) < 2:
        return word + rng.choice(string.ascii_lowercase)
    i = rng.randrange(len(word))
    op = rng.choice(("substitute", "insert", "delete", "transpose"))
    if op == "substitute":
        return word[:i] + rng.choice([c for c in string.ascii_lowercase if c != word[i]]) + word[i + 1:]
    if op == "insert":
        return word[:i] + rng.choice(string.ascii_lowercase) + word[i:]
    if op == "delete" and len(word) > 3:
        return word[:i] + word[i + 1:]
    i = min(i, len(word) - 2)
    if word[i] == word[i + 1]:
        return word[:i] + rng.choice([c for c in string.ascii_lowercase if c != word[i]]) + word[i + 1:]
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def population(count: int, seed: int) -> list[Demographics]:
    rng = random.Random(seed)
    rows = _originals()
    start = datetime.date(1930, 1, 1).toordinal()
    people = []
    for _ in range(count):
        people.append(Demographics(
            given=rng.choice(rows)["given_name"], family=rng.choice(rows)["surname"],
            birth_date=datetime.date.fromordinal(start + rng.randrange(31_000)).strftime("%Y%m%d"),
            sex=rng.choice("mf"), **_address(rng, rows),
        ))
    return people


def _address(rng: random.Random, rows: list[dict[str, str]], *, not_in: str = "") -> dict[str, str]:
    """An address of its own: a street of one row, the place of another, a number and a phone."""
    street = rng.choice(rows)
    place = rng.choice([r for r in rng.sample(rows, 20) if r["state"] != not_in])
    return {"street_number": str(rng.randrange(1, 400)), "street": street["address_1"],
            "address_extra": street["address_2"] if rng.random() < 0.3 else "", "locality": place["suburb"],
            "postcode": place["postcode"], "state": place["state"],
            "phone": f"0{rng.randrange(2, 9)}{rng.randrange(10**7, 10**8)}"}


def harsh(person: Demographics, kind: str, rng: random.Random, rows: list[dict[str, str]]) -> Demographics:
    out = replace(person, given=typo(rng, person.given))
    if kind in ("typos_moved", "typos"):
        out = replace(out, family=typo(rng, person.family))
    if kind == "married":
        out = replace(person, family=rng.choice([r["surname"] for r in rng.sample(rows, 8)
                                                 if r["surname"] != person.family]))
    if kind in ("typos_moved", "married"):
        out = replace(out, **_address(rng, rows, not_in=person.state))
    return out


def housemate(person: Demographics, stranger: Demographics, rng: random.Random) -> Demographics:
    """Someone else at ``person``'s address (same street, number, area and home phone): a spouse,
    parent or child, with the family name too four times in five."""
    family = person.family if rng.random() < 0.8 else stranger.family
    return replace(person, given=stranger.given, family=family, birth_date=stranger.birth_date, sex=stranger.sex)


def run(count: int, seed: int) -> dict:
    rng = random.Random(seed + 1)
    rows = _originals()
    people = population(2 * count, seed)
    at_a, others = people[:count], people[count:]
    encoder = Encoder(KEY, oprf_key=OPRF_KEY)
    index = matching.Index()
    for i, person in enumerate(at_a):
        index.add(f"a{i}", encoder.encode(person))
    b_records: list[tuple[str, Demographics, int | None]] = []   # (kind, demographics, person at A)
    for i, person in enumerate(at_a):
        if rng.random() < 0.5:
            kind = rng.choice([k for k in KINDS if k != "married" or person.sex == "f"])
            b_records.append((kind, harsh(person, kind, rng, rows), i))
    housemates = len(b_records) // 5
    for person in others[:len(b_records)]:
        b_records.append(("new", person, None))
    for i in rng.sample(range(count), housemates):
        b_records.append((HOUSEHOLD, housemate(at_a[i], others[-1 - i], rng), None))
    per_kind: dict[str, Counter] = {k: Counter() for k in (*KINDS, "new", HOUSEHOLD)}
    false_links = 0
    links = 0
    housemate_links = 0
    for kind, demo, truth in b_records:
        enc = encoder.encode(demo)
        decisions = {cid: matching.classify(matching.score(enc, index.get(cid))) for cid in index.candidates(enc)}
        counts = per_kind[kind]
        counts["records"] += 1
        linked = {cid for cid, d in decisions.items() if d == "link"}
        counts["linked"] += bool(linked)
        counts["to_review"] += "review" in decisions.values()
        links += len(linked)
        false_links += len(linked - {f"a{truth}"})
        housemate_links += len(linked) if kind == HOUSEHOLD else 0
        if truth is not None:
            decision = decisions.get(f"a{truth}", "not_a_candidate")
            counts[decision] += 1
    others_links, others_wrong = links - housemate_links, false_links - housemate_links
    out: dict = {"people_at_a": count, "records_at_b": len(b_records), "links": links, "false_links": false_links,
                 "precision": round(1 - false_links / links, 5) if links else 1.0,
                 "precision_without_housemates": round(1 - others_wrong / others_links, 5) if others_links else 1.0,
                 "kinds": {}}
    for kind, counts in per_kind.items():
        n = counts["records"]
        out["kinds"][kind] = {"records": n, "linked": counts["linked"], "to_review": counts["to_review"]} \
            if kind in ("new", HOUSEHOLD) else {
            "records": n, "recall": round(counts["link"] / n, 4) if n else None,
            "review": round(counts["review"] / n, 4) if n else None,
            "missed": n - counts["link"] - counts["review"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=5000, help="people registered at institution A")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = run(args.people, args.seed)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"A: {figures['people_at_a']} people; B: {figures['records_at_b']} records "
          f"(half of them people also at A); automatic links {figures['links']}, "
          f"of them wrong {figures['false_links']} (precision {figures['precision']}; "
          f"{figures['precision_without_housemates']} without the housemates)")
    for kind, k in figures["kinds"].items():
        if kind in ("new", HOUSEHOLD):
            print(f"  {kind:12s} {k['records']:5d}: linked to someone {k['linked']}, sent to review {k['to_review']}")
            continue
        print(f"  {kind:12s} {k['records']:5d}: linked {k['recall'] * 100:6.2f}%, to review {k['review'] * 100:5.2f}%, "
              f"missed {k['missed']}")


if __name__ == "__main__":
    main()
