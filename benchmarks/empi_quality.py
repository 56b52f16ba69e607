"""EMPI matching quality on FEBRL-format data: the project's own encoder, index and matcher.

Each CSV row is normalized (`Demographics.from_febrl`), encoded under a fixed test
key, looked up in the blocking `Index`, scored against every candidate and
classified, exactly as an enrolment would be. Ground truth is the N of `rec-N-...`:
rows with the same N are the same person. A pair counts as found when `classify`
says "link"; pairs it sends to review are reported apart.

    python benchmarks/empi_quality.py [--dedup FILE] [--no-id] [--json]
    python benchmarks/empi_quality.py --left A --right B [--no-id] [--json]
    python benchmarks/empi_quality.py --split FILE [--overlap 0.5] [--seed 1] [--no-id] [--json]
    python benchmarks/empi_quality.py --fit FILE... [--iterations 200]

FILE may be a path or the name of a set shipped in `tests/data/febrl/` (`dataset1.csv`,
`dataset2.csv`, `dataset3.csv`); with no mode, `--dedup dataset2.csv` runs.
`--dedup` enrols the rows of one file in order; each is compared with those before it.
`--left/--right` enrols the left file, then looks up each right row among the left
ones (two institutions). `--split` makes the two institutions from one file: each
person's records are shuffled (seeded) and, with probability `--overlap`, the person
is registered at both (first record left, second right, any others either side),
otherwise at one of them. `--no-id` ignores `soc_sec_id`.

`--fit` refits the model: it runs deduplication of the files without the national
id, counts u (how often non-matches show each agreement level) on random pairs,
fits m by EM over the blocked candidate pairs (EM does not see the ground truth),
and prints the `MODEL` weights to paste into `ehrnode/empi/matching.py`, with the
precision, recall and F1 each threshold would give (that choice does use the
ground truth). Run with the weights it printed, it prints them again.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ehrnode.empi import matching
from ehrnode.empi.encoding import Encoder
from ehrnode.empi.normalize import Demographics

#: The FEBRL sets shipped with the repository; a bare file name is looked for here.
DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "febrl"
#: The key every run uses, so results are reproducible (any 32 bytes give the same quality).
TEST_KEY = bytes(range(32))
#: Stands in for the consortium's OPRF key, which no node holds: the encodings are the same function.
TEST_OPRF_KEY = 0x5EED

Row = dict[str, str]


def data_file(name: str) -> Path:
    """``name`` as given if it exists, else the shipped FEBRL set of that name."""
    path = Path(name)
    if not path.exists() and (DATA / path.name).exists():
        return DATA / path.name
    return path


def read_rows(path: Path) -> list[Row]:
    """The rows of a FEBRL CSV (spaces after the commas are not part of the values)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, skipinitialspace=True))


def person(row: Row) -> str:
    return row["rec_id"].split("-")[1]


def split_rows(rows: list[Row], overlap: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Two institutions from one set: see the module docstring."""
    rng = random.Random(seed)
    people: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        people[person(row)].append(row)
    left: list[Row] = []
    right: list[Row] = []
    for pid in sorted(people, key=int):
        records = people[pid]
        rng.shuffle(records)
        if len(records) > 1 and rng.random() < overlap:
            left.append(records[0])
            right.append(records[1])
            for extra in records[2:]:
                (left if rng.random() < 0.5 else right).append(extra)
        else:
            (left if rng.random() < 0.5 else right).extend(records)
    rng.shuffle(left)
    rng.shuffle(right)
    return left, right


class Run:
    """One evaluation: enrolments in, pair decisions and timings out."""

    def __init__(self, national_id: bool) -> None:
        self.encoder = Encoder(TEST_KEY, oprf_key=TEST_OPRF_KEY)
        self.index = matching.Index()
        self.national_id = national_id
        self.people: dict[str, str] = {}           # enrolment id -> person
        self.linked: set[tuple[str, str]] = set()
        self.review: set[tuple[str, str]] = set()
        self.candidates: set[tuple[str, str]] = set()
        self.scores: list[tuple[tuple[str, str], matching.Score]] = []
        self.enrolments = 0
        self.seconds = 0.0

    def enrol(self, rows: list[Row], prefix: str, *, compare: bool, add: bool, keep_scores: bool = False) -> None:
        for i, row in enumerate(rows):
            eid = f"{prefix}{i:06d}"
            self.people[eid] = person(row)
            start = time.perf_counter()
            enc = self.encoder.encode(Demographics.from_febrl(row, national_id=self.national_id))
            decisions = []
            if compare:
                for cid in self.index.candidates(enc):
                    s = matching.score(enc, self.index.get(cid))
                    decisions.append((cid, s, matching.classify(s)))
            if add:
                self.index.add(eid, enc)
            self.seconds += time.perf_counter() - start
            self.enrolments += 1
            for cid, s, decision in decisions:
                pair = (cid, eid)
                self.candidates.add(pair)
                if decision == "link":
                    self.linked.add(pair)
                elif decision == "review":
                    self.review.add(pair)
                if keep_scores:
                    self.scores.append((pair, s))

    def true_pairs(self, left: str | None = None) -> set[tuple[str, str]]:
        """Pairs of enrolments of one person (across the two sides only, if ``left`` is a prefix)."""
        by_person: dict[str, list[str]] = defaultdict(list)
        for eid in sorted(self.people):
            by_person[self.people[eid]].append(eid)
        pairs = set()
        for ids in by_person.values():
            for i, a in enumerate(ids):
                for b in ids[i + 1:]:
                    if left is None or (a.startswith(left) != b.startswith(left)):
                        pairs.add((a, b))
        return pairs

    def report(self, all_pairs: int, true: set[tuple[str, str]]) -> dict[str, float | int]:
        found = {tuple(sorted(p)) for p in self.linked}
        review = {tuple(sorted(p)) for p in self.review}
        candidates = {tuple(sorted(p)) for p in self.candidates}
        tp = len(found & true)
        precision = tp / len(found) if found else 1.0
        recall = tp / len(true) if true else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "records": self.enrolments,
            "true_pairs": len(true),
            "linked_pairs": len(found),
            "true_positives": tp,
            "precision": round(precision, 5),
            "recall": round(recall, 5),
            "f1": round(f1, 5),
            "review_pairs": len(review),
            "review_true": len(review & true),
            "candidate_pairs": len(candidates),
            "all_pairs": all_pairs,
            "compared_fraction": round(len(candidates) / all_pairs, 6) if all_pairs else 0.0,
            "blocking_recall": round(len(candidates & true) / len(true), 5) if true else 1.0,
            "enrolments_per_s": round(self.enrolments / self.seconds, 1) if self.seconds else 0.0,
            "seconds": round(self.seconds, 3),
        }


def dedup(rows: list[Row], national_id: bool, keep_scores: bool = False) -> tuple[Run, dict]:
    run = Run(national_id)
    run.enrol(rows, "r", compare=True, add=True, keep_scores=keep_scores)
    n = len(rows)
    return run, run.report(n * (n - 1) // 2, run.true_pairs())


def linkage(left: list[Row], right: list[Row], national_id: bool) -> tuple[Run, dict]:
    run = Run(national_id)
    run.enrol(left, "a", compare=False, add=True)
    run.enrol(right, "b", compare=True, add=False)
    return run, run.report(len(left) * len(right), run.true_pairs(left="a"))


# -- model fitting ---------------------------------------------------------------------

def fit(paths: list[Path], iterations: int, seed: int) -> None:
    """Refit the weights and print them, with F1 per threshold (see module docstring)."""
    fitted, summary, scores = fit_model(paths, iterations, seed)
    print(summary)
    for model in matching.MODEL:
        if model.name not in fitted:
            print(f'    FieldModel("{model.name}", {model.bands}, {model.weights}),  # not in the data: calibrated')
            continue
        weights, m, u = fitted[model.name]
        print(f'    FieldModel("{model.name}", {model.bands}, {weights}),'
              f"  # m={[round(x, 4) for x in m]} u={[round(x, 4) for x in u]}")
    true_total = sum(same for _, same in scores)
    print("# threshold: links, precision, recall, F1, true pairs below (with the current MODEL weights)")
    totals = [(s.total, same) for s, same in scores]
    for threshold in range(-500, 2501, 100):
        tp = sum(1 for t, same in totals if t >= threshold and same)
        links = sum(1 for t, _ in totals if t >= threshold)
        precision, recall = (tp / links if links else 1.0), tp / true_total
        f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
        print(f"#   {threshold:5d} {links:6d} {precision:.4f} {recall:.4f} {f1:.4f} {true_total - tp:5d}")


def fit_model(paths: list[Path], iterations: int, seed: int):
    """(field -> (weights, m, u), a summary line, the candidate scores with their truth).

    u (how often a non-match shows a level) is counted on random pairs of records,
    which are almost all non-matches; m (the same for matches) and the match share are
    then fitted by EM over the blocked candidate pairs with u held fixed. Fitting u on
    candidates instead would count the non-matches blocking brought together, which
    share names by construction, and make an exact name look weaker than a typo.
    Weights are made non-decreasing in the level (a closer agreement never counts less).
    """
    rng = random.Random(seed)
    candidates: list[tuple[int | None, ...]] = []
    randoms: list[tuple[int | None, ...]] = []
    scores: list[tuple[matching.Score, bool]] = []
    for path in paths:
        rows = read_rows(path)
        run, _ = dedup(rows, national_id=False, keep_scores=True)
        for (a, b), s in run.scores:
            candidates.append(_levels(s))
            scores.append((s, run.people[a] == run.people[b]))
        ids = sorted(run.people)
        for _ in range(RANDOM_PAIRS):
            a, b = rng.sample(ids, 2)
            randoms.append(_levels(matching.score(run.index.get(a), run.index.get(b))))
    names = [e.field for e in scores[0][0].fields]
    sizes = {m.name: len(m.weights) for m in matching.MODEL}
    u = [_frequencies([pt[i] for pt in randoms], sizes[name]) for i, name in enumerate(names)]
    m, p = em(candidates, u, [sizes[n] for n in names], iterations)
    true_share = sum(same for _, same in scores) / len(scores)
    summary = (f"# u from {len(randoms)} random pairs; m by EM over {len(candidates)} candidate pairs of "
               f"{', '.join(p.name for p in paths)}; match share {p:.3f} (true {true_share:.3f})")
    fitted = {}
    for i, name in enumerate(names):
        if all(pt[i] is None for pt in candidates):
            continue
        weights: list[int] = []
        for mi, ui in zip(m[i], u[i], strict=False):
            w = round(matching.WEIGHT_SCALE * math.log2(mi / ui))
            weights.append(max(w, weights[-1]) if weights else w)
        fitted[name] = (tuple(weights), m[i], u[i])
    return fitted, summary, scores


#: Random pairs drawn from each file to count u.
RANDOM_PAIRS = 100_000


def _levels(s: matching.Score) -> tuple[int | None, ...]:
    return tuple(e.level for e in s.fields)


def _frequencies(levels: list[int | None], size: int) -> list[float]:
    counts = [1.0] * size          # add-one: a level never seen is rare, not impossible
    for level in levels:
        if level is not None:
            counts[level] += 1
    return [c / sum(counts) for c in counts]


def em(patterns: list[tuple[int | None, ...]], u: list[list[float]], sizes: list[int], iterations: int):
    """m per field and level, and the match share, by EM with u fixed; unknown levels are skipped."""
    m = [[(lv + 1) ** 2 / sum((x + 1) ** 2 for x in range(n)) for lv in range(n)] for n in sizes]
    p = 0.5
    for _ in range(iterations):
        counts = [[1e-3] * n for n in sizes]
        total_g = 0.0
        for pattern in patterns:
            lm, lu = p, 1.0 - p
            for i, level in enumerate(pattern):
                if level is not None:
                    lm *= m[i][level]
                    lu *= u[i][level]
            g = lm / (lm + lu)
            total_g += g
            for i, level in enumerate(pattern):
                if level is not None:
                    counts[i][level] += g
        p = total_g / len(patterns)
        m = [[c / sum(row) for c in row] for row in counts]
    return m, p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dedup", type=data_file, metavar="FILE")
    mode.add_argument("--left", type=data_file, metavar="A")
    mode.add_argument("--split", type=data_file, metavar="FILE")
    mode.add_argument("--fit", type=data_file, nargs="+", metavar="FILE")
    parser.add_argument("--right", type=data_file, metavar="B")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-id", action="store_true", help="ignore soc_sec_id")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not (args.dedup or args.left or args.split or args.fit):
        args.dedup = DATA / "dataset2.csv"
    national_id = not args.no_id
    if args.fit:
        fit(args.fit, args.iterations, args.seed)
        return 0
    if args.dedup:
        _, result = dedup(read_rows(args.dedup), national_id)
        result = {"mode": "dedup", "file": args.dedup.name, **result}
    elif args.left:
        if args.right is None:
            parser.error("--left needs --right")
        _, result = linkage(read_rows(args.left), read_rows(args.right), national_id)
        result = {"mode": "linkage", "left": args.left.name, "right": args.right.name, **result}
    else:
        left, right = split_rows(read_rows(args.split), args.overlap, args.seed)
        _, result = linkage(left, right, national_id)
        result = {"mode": "split", "file": args.split.name, "overlap": args.overlap, "seed": args.seed,
                  "left_records": len(left), "right_records": len(right), **result}
    result["national_id"] = national_id
    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for name, value in result.items():
            print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
