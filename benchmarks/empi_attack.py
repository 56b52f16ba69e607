"""Two published attacks on the EMPI's encodings, by a reader without the keys.

Who: the regulator, or anyone holding a copy of the chain and a member's sealing key (a backup,
a stolen disk): they read every ``empi.enrol`` but hold no OPRF share and no ``consortium.key``,
so they cannot encode a guess. What they can do is count and correlate.

* **Frequency** (Kuzu et al., 2011; Christen et al., 2017 for the variants since): encodings are
  deterministic, so every patient named Smith has the same ``family`` filter; aligning the
  commonest filters with the commonest surnames names the patients behind them.
* **Pattern mining** (after Christen et al., 2018): a q-gram sets the same positions in every
  filter that holds it, so those positions are all set together in its records. Grow sets of
  positions that stay set together, keep the ones whose support settles, name them q-grams by
  frequency and co-occurrence, read each filter's q-grams, take the reference value that agrees.

Here the target is a FEBRL set encoded as institutions encode it (``--target``, default
``dataset3.csv``); the attacker's reference is another FEBRL set drawn from the same population
(``--reference``, default ``dataset2.csv``), in plain text: a strong attacker, whose frequency
table matches the population the target was drawn from. For each field it reports the share of
records whose value each attack names correctly, and the share whose given and family name are
both named: the re-identification rate. With the ground truth the attacker lacks, it also says
how many mined position sets are exactly one q-gram's records and how many were named rightly.

    python benchmarks/empi_attack.py [--target dataset3.csv] [--reference dataset2.csv] [--no-mining] [--json]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ehrnode.empi.encoding import FIELD_INDEX, Encoder, Encodings, qgrams
from ehrnode.empi.encoding import FIELDS as SPECS
from ehrnode.empi.normalize import Demographics

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "febrl"
FIELDS = ("given", "family", "locality", "postcode", "street")
#: The fields the pattern-mining attack goes after (the names: the most q-grams, the most to gain).
MINED = ("given", "family")
#: Stand in for the consortium's keys, which the attacker does not hold (any keys give the same result).
KEY = bytes(range(32))
OPRF_KEY = 0x5EED


def rows(name: str) -> list[dict[str, str]]:
    path = Path(name) if Path(name).exists() else DATA / name
    with open(path, newline="", encoding="utf-8") as f:
        return [{k.strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(f)]


def frequency(field: str, target: list[Demographics], encoded: list[Encodings],
              reference: list[Demographics]) -> tuple[list[bool], dict]:
    """Kuzu et al. (2011): align the commonest filters with the commonest values."""
    # What the attacker sees: how often each filter occurs. What it knows: how often each value does.
    filters = Counter(e.filter(field) for e in encoded if e.filter(field) is not None)
    values = Counter(getattr(d, field) for d in reference if getattr(d, field))
    guess = {f: v for (f, _), (v, _) in zip(filters.most_common(), values.most_common(), strict=False)}
    hits = [e.filter(field) is not None and guess.get(e.filter(field)) == getattr(d, field)
            for d, e in zip(target, encoded, strict=True)]
    return hits, {"distinct_filters": len(filters)}


# -- pattern mining -------------------------------------------------------------------------

def columns(filters: list[int], width: int) -> list[int]:
    """Per published bit position, the set of records (as an int's bits) that have it set."""
    cols = [0] * width
    for r, f in enumerate(filters):
        x = f
        while x:
            low = x & -x
            cols[low.bit_length() - 1] |= 1 << r
            x ^= low
    return cols


def complement_pairs(cols: list[int], n: int) -> int:
    """How many position pairs are exact complements across all records (balancing's pairs,
    which a reader finds without any key)."""
    everyone, found = (1 << n) - 1, 0
    taken: set[int] = set()
    for i in range(len(cols)):
        for j in range(i + 1, len(cols)):
            if i not in taken and j not in taken and cols[i] & cols[j] == 0 and cols[i] | cols[j] == everyone:
                found += 1
                taken.update((i, j))
    return found


def grow(cols: list[int], seed: tuple[int, int], k: int) -> tuple[list[int], int] | None:
    """Grow a set of positions from a seed pair, adding the position that keeps the most records
    with all of them set. A q-gram's positions are all set in every record holding it, so once
    the set covers one q-gram its support settles at that q-gram's records; kept only then, and
    only if it has about k positions (two q-grams that often go together give about 2k)."""
    items = list(seed)
    support = cols[seed[0]] & cols[seed[1]]
    history = [support.bit_count()]
    while len(items) < 3 * k:
        best, p = max(((support & cols[p]).bit_count(), p) for p in range(len(cols)) if p not in items)
        settled = len(history) >= 4 and history[-4] - history[-1] <= 0.01 * history[-1]
        if settled and best < 0.97 * history[-1]:
            break
        items.append(p)
        support &= cols[p]
        history.append(best)
    settled = len(history) >= 4 and history[-4] - history[-1] <= 0.01 * history[-1]
    if not settled or not 0.6 * k <= len(items) <= 1.25 * k:
        return None
    return items, support


def mine(cols: list[int], n: int, k: int, limit: int = 120) -> list[tuple[list[int], int]]:
    """Frequent position sets, seeded by the pairs that co-occur most above chance."""
    counts = [c.bit_count() for c in cols]
    width = len(cols)
    seeds = sorted((((cols[i] & cols[j]).bit_count() - counts[i] * counts[j] / n), i, j)
                   for i in range(width) for j in range(i + 1, width))
    found: list[tuple[list[int], int]] = []
    covered: set[tuple[int, int]] = set()
    for tried, (excess, i, j) in enumerate(reversed(seeds)):
        if len(found) >= limit or excess < 0.004 * n or tried > 20_000:
            break
        if (i, j) in covered:
            continue
        got = grow(cols, (i, j), k)
        if got is None or any(got[1] == support for _, support in found):
            continue
        items = sorted(got[0])
        covered.update((a, b) for a in items for b in items if a < b)
        found.append(got)
    return found


def name_sets(found: list[tuple[list[int], int]], n: int, reference: dict[str, int],
              n_ref: int) -> dict[str, tuple[list[int], int]]:
    """Which q-gram each position set is: the reference q-gram of close frequency whose
    co-occurrence with the q-grams named so far best agrees with the sets' (most frequent first)."""
    freq = {g: s.bit_count() / n_ref for g, s in reference.items()}
    named: list[tuple[str, list[int], int]] = []
    for items, support in sorted(found, key=lambda t: -t[1].bit_count()):
        share = support.bit_count() / n
        taken = {g for g, _, _ in named}
        options = [g for g in freq if g not in taken and 0.6 * share <= freq[g] <= 1.6 * share]
        if not options:
            continue

        best = min(options, key=lambda g: _misfit(g, share, support, n, named, freq, reference, n_ref))
        named.append((best, items, support))
    return {g: (items, support) for g, items, support in named}


def _misfit(g: str, share: float, support: int, n: int, named: list[tuple[str, list[int], int]],
            freq: dict[str, float], reference: dict[str, int], n_ref: int) -> float:
    """How badly naming a set (its share of records, its records) q-gram ``g`` fits what is known."""
    cost = abs(freq[g] - share) / share
    for g2, _, support2 in named:
        seen = (support & support2).bit_count() / n
        expected = (reference[g] & reference[g2]).bit_count() / n_ref
        cost += 2 * abs(seen - expected) / share
    return cost


def pattern_mining(field: str, target: list[Demographics], encoded: list[Encodings],
                   reference: list[Demographics]) -> tuple[list[bool], dict]:
    """Christen et al. (2018) in outline: mine the position sets of frequent q-grams, name them
    by frequency and co-occurrence, read each filter's q-grams, and take the reference value
    whose q-grams agree best (the more frequent on a tie)."""
    spec = SPECS[FIELD_INDEX[field]]
    rows_ = [r for r, e in enumerate(encoded) if e.filter(field) is not None]
    filters = [encoded[r].filter(field) for r in rows_]
    n = len(filters)
    cols = columns(filters, 2 * spec.bits)    # type: ignore[arg-type]
    found = mine(cols, n, spec.k)
    values = [getattr(d, field) for d in reference if getattr(d, field)]
    grams: dict[str, int] = {}
    for r, v in enumerate(values):
        for g in qgrams(v):
            grams[g] = grams.get(g, 0) | (1 << r)
    named = name_sets(found, n, grams, len(values))
    # How well it went, with the ground truth the attacker lacks: sets that are exactly one q-gram's records.
    truth: dict[str, int] = {}
    for r, row in enumerate(rows_):
        for g in qgrams(getattr(target[row], field)):
            truth[g] = truth.get(g, 0) | (1 << r)
    exact = sum(any(support == s for s in truth.values()) for _, support in found)
    right = sum(truth.get(g) == support for g, (_, support) in named.items())
    universe = set(named)
    candidates = [(v, set(qgrams(v)) & universe, c) for v, c in Counter(values).items()]
    guesses: dict[frozenset[str], str] = {}
    hits = [False] * len(target)
    for r, row in enumerate(rows_):
        present = frozenset(g for g, (items, _) in named.items() if all(cols[p] >> r & 1 for p in items))
        if present not in guesses:
            guesses[present] = max(candidates, key=lambda t: (
                2 * len(present & t[1]) / max(1, len(present) + len(t[1])), t[2]))[0]
        hits[row] = guesses[present] == getattr(target[row], field)
    stats = {"complement_pairs": complement_pairs(cols, n), "position_sets": len(found),
             "exact_qgram_sets": exact, "named_qgrams": len(named), "named_right": right}
    return hits, stats


def attack(target: list[Demographics], reference: list[Demographics], *, mining: bool = True) -> dict:
    encoder = Encoder(KEY, oprf_key=OPRF_KEY)
    encoded = [encoder.encode(d) for d in target]
    named: dict[str, list[bool]] = {}
    out: dict = {"records": len(target), "fields": {}}
    for field in FIELDS:
        hits, stats = frequency(field, target, encoded, reference)
        out["fields"][field] = {"frequency": round(sum(hits) / len(hits), 4), **stats}
        if mining and field in MINED:
            mined, stats = pattern_mining(field, target, encoded, reference)
            out["fields"][field].update(pattern_mining=round(sum(mined) / len(mined), 4), **stats)
            hits = [a or b for a, b in zip(hits, mined, strict=True)]
        named[field] = hits
        out["fields"][field]["either"] = round(sum(hits) / len(hits), 4)
    both = [g and f for g, f in zip(named["given"], named["family"], strict=True)]
    out["reidentified"] = round(sum(both) / len(both), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="dataset3.csv", help="the FEBRL set whose encodings are attacked")
    parser.add_argument("--reference", default="dataset2.csv", help="the attacker's frequency table (plain values)")
    parser.add_argument("--no-mining", action="store_true", help="the frequency attack only (seconds, not a minute)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    target = [Demographics.from_febrl(r) for r in rows(args.target)]
    reference = [Demographics.from_febrl(r) for r in rows(args.reference)]
    figures = attack(target, reference, mining=not args.no_mining)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"attacks on {figures['records']} encoded records ({args.target}), plain values for reference from "
          f"{args.reference}; share of records whose value each attack names")
    for field, f in figures["fields"].items():
        line = f"  {field:10s} frequency {f['frequency'] * 100:5.2f}% ({f['distinct_filters']} distinct filters)"
        if "pattern_mining" in f:
            line += (f"; pattern mining {f['pattern_mining'] * 100:5.2f}% ({f['complement_pairs']} complement pairs "
                     f"found, {f['position_sets']} position sets mined, {f['exact_qgram_sets']} exactly one q-gram's, "
                     f"{f['named_qgrams']} named, {f['named_right']} rightly)")
        print(line + f"; either {f['either'] * 100:5.2f}%")
    print(f"given and family name both named (re-identified): {figures['reidentified'] * 100:.2f}% of records")


if __name__ == "__main__":
    main()
