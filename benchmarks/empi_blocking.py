"""What one crafted enrolment costs every validator: blocking keys chosen to share big blocks.

A member controls the encodings it enrols, blocking keys included, and they are opaque. It
can enrol 16,000 patients whose 16 blocking keys fall 1,000 to a key, then one whose 16 keys
are exactly those: every validator then scores that enrolment against every enrolment in
those blocks while it applies the block. This script builds that registry (the ledger's own
`EmpiRegistry` over SQLite, as a validator applies it), then times applying the crafted
enrolment and an ordinary one, with the candidate bound the ledger uses
(`matching.MAX_CANDIDATES`) and, for comparison, with it lifted.

    python benchmarks/empi_blocking.py [--block 1000] [--keys 16] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ehrnode import synthetic
from ehrnode.empi import matching
from ehrnode.empi.encoding import Encoder, Encodings
from ehrnode.empi.normalize import Demographics
from ehrnode.ledger.empi_registry import SCHEMA, EmpiRegistry
from ehrnode.storage import open_db, transaction


def build(directory: Path, block: int, keys: int) -> tuple[EmpiRegistry, sqlite3.Connection,
                                                            list[tuple[str, Encodings]]]:
    db = open_db(directory / "state.sqlite3", SCHEMA, "benchmark state")
    registry = EmpiRegistry(db)
    encoder = Encoder(bytes(range(32)), oprf_key=0x5EED)
    people = synthetic.people(64, seed=3)
    base = [encoder.encode(Demographics.from_fhir(synthetic.patient_resources(p, "B")[0])) for p in people]
    crafted = [bytes([0xC0, k]) + bytes(6) for k in range(keys)]
    with transaction(db, "fill") as tx:
        for n in range(block * keys):
            # Each filler shares exactly one crafted key, and is otherwise an ordinary patient.
            enc = dataclasses.replace(base[n % len(base)], national_id=None, blocking=(crafted[n // block],))
            body = {"epoch": 0, "enrolment": n.to_bytes(16, "big"), "institution": "B", "encodings": enc.to_wire()}
            registry.enrol(tx, body, "B", 1, n.to_bytes(32, "big"))
    attack = dataclasses.replace(base[0], national_id=None, blocking=tuple(sorted(crafted)))
    ordinary = encoder.encode(Demographics.from_fhir(synthetic.patient_resources(
        synthetic.people(1, seed=99)[0], "B")[0]))
    return registry, db, [("crafted", attack), ("ordinary", ordinary)]


def timed_enrol(registry: EmpiRegistry, db: sqlite3.Connection, name: str, enc: Encodings) -> dict:
    """Apply one enrolment as a validator would, timed, then roll it back (the next probe
    finds the same registry)."""
    body = {"epoch": 0, "enrolment": os.urandom(16), "institution": "B", "encodings": enc.to_wire()}
    candidates = len(registry.candidates(db, enc))
    registry._decoded.clear()  # a validator that has not just decoded these enrolments
    db.execute("BEGIN IMMEDIATE")
    started = time.perf_counter()
    try:
        registry.enrol(db, body, "B", 2, os.urandom(32))
        seconds = time.perf_counter() - started
    finally:
        db.execute("ROLLBACK")
    return {"enrolment": name, "candidates": candidates, "ms": round(seconds * 1000, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block", type=int, default=1000, help="enrolments sharing each crafted key")
    parser.add_argument("--keys", type=int, default=16, help="crafted keys (at most 16 per enrolment)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        registry, db, probes = build(Path(tmp), args.block, args.keys)
        fill_s = time.perf_counter() - started
        bound = matching.MAX_CANDIDATES
        for label, limit in (("bounded", bound), ("unbounded", 10 ** 9)):
            matching.MAX_CANDIDATES = limit
            for name, enc in probes:
                results.append({"rule": label, **timed_enrol(registry, db, name, enc)})
        matching.MAX_CANDIDATES = bound
    summary = {"enrolments": args.block * args.keys, "fill_seconds": round(fill_s, 1),
               "max_candidates": bound, "max_block": matching.MAX_BLOCK, "runs": results}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['enrolments']} enrolments in {args.keys} crafted blocks of {args.block} "
              f"(filled in {summary['fill_seconds']} s); MAX_CANDIDATES {bound}, MAX_BLOCK {matching.MAX_BLOCK}")
        for r in results:
            print(f"  {r['rule']:<10} {r['enrolment']:<9} candidates {r['candidates']:>6}  apply {r['ms']:>8} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
