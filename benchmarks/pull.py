"""Sharing throughput: verified pulls between members of a four-member consortium on loopback.

Starts four `ehrnode run` processes from a fresh `consortium init` (institutions A, B and C and
the regulator R) and records synthetic patients at each institution. Then:

* throughput: `--concurrency` requesters, each with its own API connection to A, B or C (round
  robin), pull random records owned by the other two institutions for purpose "treatment", for
  `--seconds` or until `--pulls` pulls are done. Every pull commits its access log at the owner
  and is verified at the requester (log committed, commitment matches) before it counts.
  Reported: verified pulls/s, latency p50/p99/max, errors by reason, CPU per node (and of
  this process: "bench");
* large documents: C records `--large` Observations of about `--large-mb` MB each, made of
  coded components (what survives de-identification), and A pulls them one after the other;
  reported in MB/s of released canonical JSON, with the size actually released.

    python benchmarks/pull.py [--seconds 20 | --pulls N] [--concurrency 48] [--patients 20]
                              [--large 5] [--large-mb 2.5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ehrnode import synthetic
from ehrnode.client import ApiClient
from ehrnode.errors import EhrnodeError
from ehrnode.localnet import LocalConsortium
from ehrnode.records import fhir
from ehrnode.records.canonical import canonical_json
from ehrnode.records.submit import MAX_RESOURCE_BYTES, add_items

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import verify_rate  # the cluster benchmark's, beside this one

INSTITUTIONS = ["A", "B", "C"]
PURPOSE = "treatment"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(sorted_ms: list[float], q: float) -> float | None:
    return round(sorted_ms[int(q * (len(sorted_ms) - 1))], 1) if sorted_ms else None


def big_observation(patient_id: str, k: int, components: int) -> dict:
    """A lab panel of ``components`` coded quantities for ``patient_id``: no free text to drop."""
    return {
        "resourceType": "Observation", "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"ehrnode-bench/large/{k}")),
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "11502-2", "display": "Laboratory report"}]},
        "subject": {"reference": f"Patient/{patient_id}"}, "effectiveDateTime": "2024-03-01T09:00:00+08:00",
        "component": [{
            "code": {"coding": [{"system": "http://loinc.org", "code": f"{10000 + i}-{i % 10}",
                                 "display": f"Analyte {i}"}]},
            "valueQuantity": {"value": round(i * 0.37, 2), "unit": "mg/dL", "system": "http://unitsofmeasure.org",
                              "code": "mg/dL"},
        } for i in range(components)],
    }


def large_documents(patient_id: str, count: int, megabytes: float) -> list[fhir.Item]:
    """``count`` Observations of about ``megabytes`` of canonical JSON each, within the intake limit."""
    base = len(canonical_json(big_observation(patient_id, 0, 0)))
    each = (len(canonical_json(big_observation(patient_id, 0, 1000))) - base) / 1000
    components = max(1, int((megabytes * 1e6 - base) / each))
    while len(json.dumps(big_observation(patient_id, 0, components))) > MAX_RESOURCE_BYTES:
        components = int(components * 0.95)
    return [fhir.Item(f"large:{k}", big_observation(patient_id, k, components)) for k in range(count)]


async def record(cluster: LocalConsortium, name: str, items: list[fhir.Item]) -> list[dict]:
    """Record ``items`` at ``name``; the committed rows."""
    async with ApiClient.connect(cluster.configs[name]) as client:
        result = await add_items(client, items, timeout=120)
    rows = [dict(r, height=result.heights.get(r["tx_id"])) for r in result.records if r["tx_id"]]
    if not rows or any(r["height"] is None for r in rows):
        raise SystemExit(f"{name}: {sum(r['height'] is None for r in rows)} of {len(rows)} anchors not committed")
    return rows


async def throughput(cluster: LocalConsortium, owned: dict[str, list[str]], concurrency: int,
                     seconds: float, pulls: int | None) -> dict:
    latencies: list[float] = []
    access_txs: set[str] = set()
    errors: Counter[str] = Counter()
    tickets = iter(range(pulls)) if pulls else None
    deadline = time.perf_counter() + seconds

    def more() -> bool:
        if tickets is not None:
            return next(tickets, None) is not None
        return time.perf_counter() < deadline

    async def requester(k: int) -> None:
        name = INSTITUTIONS[k % len(INSTITUTIONS)]
        choices = [r for other in INSTITUTIONS if other != name for r in owned[other]]
        rng = random.Random(k)
        async with ApiClient.connect(cluster.configs[name]) as client:
            while more():
                sent = time.perf_counter()
                try:
                    pulled = await client.call("records.pull", record_id=rng.choice(choices), purpose=PURPOSE,
                                               timeout=60)
                except EhrnodeError as exc:
                    errors[exc.reason] += 1
                    continue
                if pulled.get("verified"):
                    latencies.append(1000 * (time.perf_counter() - sent))
                    access_txs.add(pulled["access_tx"])
                else:
                    errors["unverified"] += 1

    cpu_before = {n: cpu_seconds(p.pid) for n, p in cluster.procs.items()}
    cpu_before["bench"] = time.process_time()
    height_before = await cluster.height("R")
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for k in range(concurrency):
            nursery.start_soon(requester, k)
    elapsed = time.perf_counter() - start
    cpu_after = {n: cpu_seconds(p.pid) for n, p in cluster.procs.items()}
    cpu_after["bench"] = time.process_time()
    blocks = await cluster.height("R") - height_before
    latencies.sort()
    return {
        "concurrency": concurrency, "seconds": round(elapsed, 2), "verified": len(latencies),
        "pulls_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
        "p99_ms": percentile(latencies, 0.99), "max_ms": round(latencies[-1], 1) if latencies else None,
        "errors": dict(errors),
        "decisions_per_access_tx": round(len(latencies) / len(access_txs), 2) if access_txs else None,
        "blocks_per_s": round(blocks / elapsed, 1),
        "access_txs_per_block": round(len(access_txs) / blocks, 2) if blocks else None,
        "cpu_per_node": {n: round((cpu_after[n] - cpu_before[n]) / elapsed, 2) for n in cpu_after},
    }


async def large(cluster: LocalConsortium, patient_id: str, count: int, megabytes: float) -> dict:
    items = large_documents(patient_id, count, megabytes)
    started = time.perf_counter()
    rows = await record(cluster, "C", items)
    record_s = time.perf_counter() - started
    await cluster.wait_height(["A"], max(r["height"] for r in rows))
    sizes, times, errors = [], [], Counter()
    async with ApiClient.connect(cluster.configs["A"]) as client:
        for row in rows:
            sent = time.perf_counter()
            try:
                pulled = await client.call("records.pull", record_id=row["record_id"], purpose=PURPOSE, timeout=120)
            except EhrnodeError as exc:
                errors[exc.reason] += 1
                continue
            times.append(time.perf_counter() - sent)
            if not pulled.get("verified"):
                raise SystemExit(f"large record {row['record_id']} not verified")
            sizes.append(len(canonical_json(pulled["resource"])))
    return {
        "documents": len(rows), "verified": len(sizes), "errors": dict(errors),
        "components": len(items[0].resource["component"]),
        "input_bytes": round(statistics.mean(len(json.dumps(i.resource)) for i in items)),
        "release_bytes": round(statistics.mean(sizes)) if sizes else None,
        "record_seconds": round(record_s, 2), "pull_seconds": [round(t, 3) for t in times],
        "mb_per_s": round(sum(sizes) / sum(times) / 1e6, 2) if sizes else None,
    }


async def measure(cluster: LocalConsortium, args: argparse.Namespace) -> dict:
    await cluster.wait_ready(timeout=60)
    await cluster.wait_settled()  # not while the members do their once-after-a-start work
    people = synthetic.people(args.patients, seed=1)
    owned: dict[str, list[str]] = {}
    height, patient_c = 0, ""
    started = time.perf_counter()
    for name in INSTITUTIONS:
        resources = [r for p in people for r in synthetic.patient_resources(p, name, visits=2, seed=1)]
        patient_c = patient_c or (resources[0]["id"] if name == "C" else "")
        rows = await record(cluster, name, [fhir.Item(f"bench:{name}:{i}", r) for i, r in enumerate(resources)])
        owned[name] = [r["record_id"] for r in rows]
        height = max(height, *(r["height"] for r in rows))
    await cluster.wait_height(INSTITUTIONS, height)
    setup = {"records": {n: len(v) for n, v in owned.items()}, "seconds": round(time.perf_counter() - started, 2)}
    for name in INSTITUTIONS:  # warm up each requester-owner path once
        other = INSTITUTIONS[(INSTITUTIONS.index(name) + 1) % len(INSTITUTIONS)]
        await cluster.call(name, "records.pull", record_id=owned[other][0], purpose=PURPOSE, timeout=60)
    figures = {"setup": setup}
    figures["throughput"] = await throughput(cluster, owned, args.concurrency, args.seconds, args.pulls)
    if args.large:
        figures["large"] = await large(cluster, patient_c, args.large, args.large_mb)
    return figures


def on_fresh_consortium(prefix: str, measure, args: argparse.Namespace) -> dict:
    """``measure(cluster, args)`` on a fresh four-member consortium in a temporary directory, started
    and stopped here; its figures, with the machine's core count."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        cluster = LocalConsortium(Path(tmp) / "consortium")
        cluster.start_all()
        try:
            figures = trio.run(measure, cluster, args)
        finally:
            cluster.stop_all()
    figures["cores"] = os.cpu_count() or 1
    figures["verify_per_s"] = round(verify_rate())  # Ed25519, one core, measured after the run
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the throughput phase")
    parser.add_argument("--pulls", type=int, default=None, help="a fixed number of pulls instead of --seconds")
    parser.add_argument("--concurrency", type=int, default=48, help="concurrent requesters (API connections)")
    parser.add_argument("--patients", type=int, default=20, help="synthetic patients recorded per institution")
    parser.add_argument("--large", type=int, default=5, help="large documents to record and pull (0: skip)")
    parser.add_argument("--large-mb", type=float, default=2.5, help="canonical JSON size of each large document")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = on_fresh_consortium("ehrnode-pull-", measure, args)
    if args.json:
        print(json.dumps(figures))
        return
    s, t = figures["setup"], figures["throughput"]
    print(f"cluster: 4 members on loopback, {figures['cores']} cores (Ed25519 verify {figures['verify_per_s']:,}/s "
          f"per core); records owned {s['records']} "
          f"(recorded in {s['seconds']} s)")
    print(f"verified pulls  {t['pulls_per_s']:>8} pulls/s ({t['verified']} in {t['seconds']} s, "
          f"{t['concurrency']} requesters), latency p50 {t['p50_ms']} ms, p99 {t['p99_ms']} ms, max {t['max_ms']} ms")
    print(f"                errors {t['errors'] or 'none'}; CPU per node {t['cpu_per_node']}; "
          f"{t['decisions_per_access_tx']} decisions per access log transaction, "
          f"{t['blocks_per_s']} blocks/s, {t['access_txs_per_block']} access log transactions per block")
    if "large" in figures:
        g = figures["large"]
        released = f"{g['release_bytes'] / 1e6:.2f} MB" if g["release_bytes"] else "nothing"
        print(f"large documents {g['mb_per_s']!s:>8} MB/s released ({g['verified']}/{g['documents']} Observations "
              f"of {g['components']} components verified: {g['input_bytes'] / 1e6:.2f} MB in, {released} released "
              f"each; pulls took {g['pull_seconds']} s; recorded in {g['record_seconds']} s)")
        if g["errors"]:
            print(f"                errors {g['errors']}")


if __name__ == "__main__":
    main()
