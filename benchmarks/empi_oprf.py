"""Enrolments through the threshold OPRF on a real consortium, and what one evaluation costs.

Starts the four-member test consortium (institutions A, B and C, regulator R; TLS), waits for
the OPRF key the institutions generate together, then enrols Patients made from the FEBRL rows
shipped in ``tests/data/febrl`` (realistic variety of names and addresses, so blocks stay small;
``--people synthetic`` takes the demo's generator, whose few names make every block large and
the EMPI's scoring the cost):

* **latency**: enrols patients one at a time at A (``records.add`` of one Patient, waiting for
  its commit) and reports the median and p90: blinding, the committed batch, the other
  holders' answers and their proofs, the enrolment's own commit;
* **throughput**: every institution enrols its own synthetic patients in calls of ``--batch``
  Patients, ``--concurrency`` calls at a time each, for ``--seconds``; reports enrolments a
  second across the consortium and the OPRF batches and evaluations on the chain;
* **arithmetic**: per value, the CPU time of blinding, of a holder's evaluation with its proof,
  of checking a proof and of combining, in this process.

    python benchmarks/empi_oprf.py [--seconds 20] [--batch 50] [--concurrency 2] [--people febrl] [--json]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pull import on_fresh_consortium  # the pull benchmark's, beside this one

from ehrnode import synthetic
from ehrnode.client import ApiClient
from ehrnode.empi import oprf
from ehrnode.ledger.state import LedgerState
from ehrnode.membership import Membership
from ehrnode.records import fhir
from ehrnode.records.submit import add_items

INSTITUTIONS = ("A", "B", "C")
FEBRL = Path(__file__).resolve().parents[1] / "tests" / "data" / "febrl"


def febrl_patients() -> list[dict]:
    """FHIR Patients from the FEBRL rows (without soc_sec_id, which is no national identifier)."""
    out = []
    for name in ("dataset1.csv", "dataset2.csv", "dataset3.csv"):
        with open(FEBRL / name, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f, skipinitialspace=True):
                row = {k.strip(): (v or "").strip() for k, v in row.items()}
                patient: dict = {"resourceType": "Patient", "id": f"febrl-{name[7]}-{row['rec_id']}"}
                human: dict = {"family": row["surname"]} if row["surname"] else {}
                if row["given_name"]:
                    human["given"] = [row["given_name"]]
                if human:
                    patient["name"] = [human]
                try:
                    patient["birthDate"] = datetime.datetime.strptime(row["date_of_birth"], "%Y%m%d").date().isoformat()
                except ValueError:
                    pass
                line = [x for x in (f"{row['street_number']} {row['address_1']}".strip(), row["address_2"]) if x]
                address = {k: v for k, v in (("line", line), ("city", row["suburb"]), ("postalCode", row["postcode"]),
                                             ("state", row["state"])) if v}
                if address:
                    patient["address"] = [address]
                out.append(patient)
    return out


def _patients(member: str, people) -> list[fhir.Item]:
    return [fhir.Item(f"{member}:{p['id']}", p) if isinstance(p, dict)
            else fhir.Item(f"{member}:{p.key}", synthetic.patient_resources(p, member, visits=0)[0]) for p in people]


async def measure(cluster, args) -> dict:
    await cluster.wait_ready()
    generated = await cluster.wait_oprf_key(list(INSTITUTIONS))
    people = febrl_patients() if args.people == "febrl" else synthetic.people(args.latency + 30_000, seed=7)
    latencies = []
    async with ApiClient.connect(cluster.configs["A"]) as client:
        for p in people[:args.latency]:
            started = time.perf_counter()
            await add_items(client, _patients("A", [p]), timeout=60, skip_invalid=True)
            latencies.append(time.perf_counter() - started)
    pool = iter(people[args.latency:])
    enrolled = 0
    calls: list[float] = []
    deadline = time.monotonic() + args.seconds

    async def enrol(member: str) -> None:
        nonlocal enrolled
        async with ApiClient.connect(cluster.configs[member]) as client:
            while time.monotonic() < deadline:
                batch = [p for p in (next(pool, None) for _ in range(args.batch)) if p is not None]
                if not batch:
                    return                       # every row enrolled
                started = time.perf_counter()
                out = await add_items(client, _patients(member, batch), timeout=120, skip_invalid=True)
                calls.append(time.perf_counter() - started)
                enrolled += sum(1 for r in out.records if r["resource_type"] == "Patient")

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for member in INSTITUTIONS:
            for _ in range(args.concurrency):
                nursery.start_soon(enrol, member)
    elapsed = time.monotonic() - started
    cluster.stop_all()
    state = LedgerState(cluster.configs["R"].data_dir / "state.sqlite3", cluster.genesis.chain_id,
                        Membership(0, 0, cluster.genesis.members))
    try:
        usage = state.oprf_usage.totals()
    finally:
        state.close()
    batches = sum(u["batches"] for u in usage)
    evaluations = sum(u["evaluations"] for u in usage)
    total = enrolled + len(latencies)
    return {
        "key_generated_s": round(generated, 2),
        "latency": {"enrolments": len(latencies), "p50_ms": round(statistics.median(latencies) * 1000, 1),
                    "p90_ms": round(sorted(latencies)[int(len(latencies) * 0.9)] * 1000, 1)},
        "throughput": {"enrolments": enrolled, "seconds": round(elapsed, 1),
                       "enrolments_per_s": round(enrolled / elapsed, 1), "batch": args.batch,
                       "concurrent_calls": args.concurrency * len(INSTITUTIONS),
                       "call_p50_ms": round(statistics.median(calls) * 1000, 1) if calls else None},
        "chain": {"oprf_batches": batches, "evaluations": evaluations,
                  "evaluations_per_enrolment": round(evaluations / total, 1) if total else None},
        "arithmetic_us": arithmetic(),
    }


def arithmetic(count: int = 500) -> dict:
    """Microseconds per value of each step, on ``count`` values in one batch."""
    values = [f"blocking\x1fname-year\x1fS530{1900 + i}".encode() for i in range(count)]
    share = oprf.random_scalar()
    public = oprf.base_multiply(share)
    t0 = time.perf_counter()
    blinded = [oprf.blind(v) for v in values]
    t1 = time.perf_counter()
    points = [b.point for b in blinded]
    evaluated, proof = oprf.evaluate(share, points, b"ctx")
    t2 = time.perf_counter()
    assert oprf.verify(public, points, evaluated, proof, b"ctx")
    t3 = time.perf_counter()
    oprf.combine(blinded, {1: evaluated})
    t4 = time.perf_counter()
    per = 1e6 / count
    return {"blind": round((t1 - t0) * per, 1), "evaluate_and_prove": round((t2 - t1) * per, 1),
            "verify": round((t3 - t2) * per, 1), "combine_one_answer": round((t4 - t3) * per, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the throughput phase")
    parser.add_argument("--batch", type=int, default=50, help="Patients per records.add call")
    parser.add_argument("--concurrency", type=int, default=2, help="calls in flight per institution")
    parser.add_argument("--latency", type=int, default=30, help="single enrolments timed one at a time")
    parser.add_argument("--people", choices=("febrl", "synthetic"), default="febrl", help="who is enrolled")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = on_fresh_consortium("ehrnode-oprf-", measure, args)
    if args.json:
        print(json.dumps(figures))
        return
    lat, thr, chain, ar = figures["latency"], figures["throughput"], figures["chain"], figures["arithmetic_us"]
    print(f"people: {args.people}")
    print(f"cluster: 4 members (3 institutions hold shares, threshold 2) on loopback, {figures['cores']} cores; "
          f"key generated {figures['key_generated_s']} s after the members were connected")
    print(f"one enrolment at a time: p50 {lat['p50_ms']} ms, p90 {lat['p90_ms']} ms ({lat['enrolments']})")
    print(f"throughput: {thr['enrolments_per_s']} enrolments/s ({thr['enrolments']} in {thr['seconds']} s; "
          f"{thr['concurrent_calls']} calls of {thr['batch']} in flight, call p50 {thr['call_p50_ms']} ms)")
    print(f"chain: {chain['oprf_batches']} OPRF batches, {chain['evaluations']} evaluations "
          f"({chain['evaluations_per_enrolment']} per enrolment)")
    print(f"per value, this process: blind {ar['blind']} us, evaluate+prove {ar['evaluate_and_prove']} us, "
          f"verify {ar['verify']} us, combine one answer {ar['combine_one_answer']} us")


if __name__ == "__main__":
    main()
