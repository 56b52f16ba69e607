"""A frequency attack on the EMPI's published encodings, by a reader without the keys.

Who: the regulator, or anyone holding a copy of the chain and a member's sealing key (a backup,
a stolen disk): they read every ``empi.enrol`` but hold no OPRF share and no ``consortium.key``,
so they cannot encode a guess. What they can do is count. Encodings are deterministic, so every
patient named Smith has the same ``family`` filter; aligning the commonest filters with the
commonest surnames of a public frequency table names the patients behind them (Kuzu et al.,
2011; Christen et al., 2017 for the many variants since).

Here the target is a FEBRL set encoded as institutions encode it (``--target``, default
``dataset3.csv``); the attacker's frequency table is another FEBRL set drawn from the same
population (``--reference``, default ``dataset2.csv``): a strong attacker, whose table matches
the population the target was drawn from. For each field it reports the share of records whose
value the attack names correctly, and the share of records whose given and family name are
both named: the re-identification rate.

    python benchmarks/empi_attack.py [--target dataset3.csv] [--reference dataset2.csv] [--json]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ehrnode.empi.encoding import Encoder
from ehrnode.empi.normalize import Demographics

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "febrl"
FIELDS = ("given", "family", "locality", "postcode", "street")
#: Stand in for the consortium's keys, which the attacker does not hold (any keys give the same result).
KEY = bytes(range(32))
OPRF_KEY = 0x5EED


def rows(name: str) -> list[dict[str, str]]:
    path = Path(name) if Path(name).exists() else DATA / name
    with open(path, newline="", encoding="utf-8") as f:
        return [{k.strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(f)]


def attack(target: list[Demographics], reference: list[Demographics]) -> dict:
    encoder = Encoder(KEY, oprf_key=OPRF_KEY)
    encoded = [encoder.encode(d) for d in target]
    named: dict[str, list[bool]] = {}
    out: dict = {"records": len(target), "fields": {}}
    for field in FIELDS:
        # What the attacker sees: how often each filter occurs. What it knows: how often each value does.
        filters = Counter(e.filter(field) for e in encoded if e.filter(field) is not None)
        values = Counter(getattr(d, field) for d in reference if getattr(d, field))
        guess = {f: v for (f, _), (v, _) in zip(filters.most_common(), values.most_common(), strict=False)}
        hits = [e.filter(field) is not None and guess.get(e.filter(field)) == getattr(d, field)
                for d, e in zip(target, encoded, strict=True)]
        named[field] = hits
        out["fields"][field] = {"distinct_filters": len(filters), "named": round(sum(hits) / len(hits), 4)}
    both = [g and f for g, f in zip(named["given"], named["family"], strict=True)]
    out["reidentified"] = round(sum(both) / len(both), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="dataset3.csv", help="the FEBRL set whose encodings are attacked")
    parser.add_argument("--reference", default="dataset2.csv", help="the attacker's frequency table (plain values)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    target = [Demographics.from_febrl(r) for r in rows(args.target)]
    reference = [Demographics.from_febrl(r) for r in rows(args.reference)]
    figures = attack(target, reference)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"frequency attack on {figures['records']} encoded records ({args.target}), "
          f"frequency table from {args.reference}")
    for field, f in figures["fields"].items():
        print(f"  {field:10s} {f['distinct_filters']:5d} distinct filters; value named for {f['named'] * 100:5.2f}% "
              "of records")
    print(f"given and family name both named (re-identified): {figures['reidentified'] * 100:.2f}% of records")


if __name__ == "__main__":
    main()
