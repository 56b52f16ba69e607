"""EMPI matching on harsher data than FEBRL's: a second institution where patients moved to another
state, have typos in both names, or are registered under a married name.

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

Each B record is encoded and looked up among A's enrolments as an enrolment is. Reported per
kind: automatic recall (pairs linked), pairs sent to review, and over all of B the precision
of automatic links. The aim for the kinds where the birth date, sex and fuzzy names agree
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
    for person in others[:len(b_records)]:
        b_records.append(("new", person, None))
    per_kind: dict[str, Counter] = {k: Counter() for k in (*KINDS, "new")}
    false_links = 0
    links = 0
    for kind, demo, truth in b_records:
        enc = encoder.encode(demo)
        decisions = {cid: matching.classify(matching.score(enc, index.get(cid))) for cid in index.candidates(enc)}
        counts = per_kind[kind]
        counts["records"] += 1
        linked = {cid for cid, d in decisions.items() if d == "link"}
        links += len(linked)
        false_links += len(linked - {f"a{truth}"})
        if truth is not None:
            decision = decisions.get(f"a{truth}", "not_a_candidate")
            counts[decision] += 1
    out: dict = {"people_at_a": count, "records_at_b": len(b_records), "links": links, "false_links": false_links,
                 "precision": round(1 - false_links / links, 5) if links else 1.0, "kinds": {}}
    for kind, counts in per_kind.items():
        n = counts["records"]
        out["kinds"][kind] = {"records": n} if kind == "new" else {
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
          f"of them wrong {figures['false_links']} (precision {figures['precision']})")
    for kind, k in figures["kinds"].items():
        if kind == "new":
            continue
        print(f"  {kind:12s} {k['records']:5d}: linked {k['recall'] * 100:6.2f}%, to review {k['review'] * 100:5.2f}%, "
              f"missed {k['missed']}")


if __name__ == "__main__":
    main()
