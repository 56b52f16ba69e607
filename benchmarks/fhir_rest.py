"""The FHIR REST interface against the JSON-RPC API: reads (verified pulls) per second and
Patient/$match per second, the same work through each door of the same node.

Starts four `ehrnode run` processes from a fresh `consortium init` (TLS on, as by default) and
records synthetic patients at B and C. Then, for each interface in turn, `--concurrency` clients
of member A, for `--seconds` each:

* reads: ``GET [base]/{ResourceType}/{record_id}`` (200 and ``X-Access-Log``) against
  ``records.pull`` (verified), of random records of B and C, purpose treatment. Each commits
  its access log at the owner before it is served;
* $match: ``POST [base]/Patient/$match`` with one of the recorded Patients against
  ``empi.lookup`` with the same Patient.

Reported: operations/s, latency p50/p99, errors by status or reason, and the CPU of A.

    python benchmarks/fhir_rest.py [--seconds 10] [--concurrency 32] [--patients 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pull import cpu_seconds, on_fresh_consortium, percentile, record  # the pull benchmark's, beside this one

from ehrnode import synthetic
from ehrnode.client import ApiClient
from ehrnode.errors import EhrnodeError
from ehrnode.localnet import LocalConsortium
from ehrnode.net.tls import client_context
from ehrnode.records import fhir

OWNERS = ["B", "C"]
HEADERS = {"content-type": "application/fhir+json", "accept": "application/fhir+json"}

#: One operation of one client: raises with a reason (or returns False) when it did not succeed.
Operation = Callable[[random.Random], Awaitable[bool]]
#: Client ``k``'s operation, and how to close the client.
Client = Callable[[int], Awaitable[tuple[Operation, Callable[[], Awaitable[None]]]]]


async def run_clients(cluster: LocalConsortium, make: Client, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    deadline = time.perf_counter() + seconds

    async def client(k: int) -> None:
        operation, close = await make(k)
        rng = random.Random(k)
        try:
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                try:
                    ok = await operation(rng)
                except EhrnodeError as exc:
                    errors[exc.reason] += 1
                    continue
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                    continue
                if ok:
                    latencies.append(1000 * (time.perf_counter() - sent))
                else:
                    errors["unexpected answer"] += 1
        finally:
            await close()

    cpu_before = cpu_seconds(cluster.procs["A"].pid)
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for k in range(concurrency):
            nursery.start_soon(client, k)
    elapsed = time.perf_counter() - start
    cpu = (cpu_seconds(cluster.procs["A"].pid) - cpu_before) / elapsed
    latencies.sort()
    return {"per_s": round(len(latencies) / elapsed, 1), "done": len(latencies), "seconds": round(elapsed, 2),
            "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
            "p99_ms": percentile(latencies, 0.99), "errors": dict(errors), "cpu_a": round(cpu, 2)}


class Doors:
    """Clients of member A through each interface."""

    def __init__(self, cluster: LocalConsortium, base: str, records: list[dict], patients: list[dict]) -> None:
        self.cluster, self.base, self.records, self.patients = cluster, base, records, patients
        config = cluster.configs["A"]
        self.token = (config.data_dir / "api.token").read_text().strip()
        self.tls = client_context(config.tls.ca) if config.tls is not None else None

    def _http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(verify=self.tls if self.tls is not None else False, timeout=90,
                                 headers={"authorization": f"Bearer {self.token}", **HEADERS})

    async def fhir_read(self, k: int):
        http = self._http()

        async def read(rng: random.Random) -> bool:
            row = rng.choice(self.records)
            response = await http.get(f"{self.base}/{row['resource_type']}/{row['record_id']}")
            if response.status_code != 200:
                raise EhrnodeError(f"HTTP {response.status_code}", reason=f"HTTP {response.status_code}")
            return bool(response.headers.get("x-access-log")) and response.json()["resourceType"] == row[
                "resource_type"]

        return read, http.aclose

    async def fhir_match(self, k: int):
        http = self._http()

        async def match(rng: random.Random) -> bool:
            body = {"resourceType": "Parameters", "parameter": [{"name": "resource",
                                                                 "resource": rng.choice(self.patients)}]}
            response = await http.post(f"{self.base}/Patient/$match", content=json.dumps(body).encode())
            if response.status_code != 200:
                raise EhrnodeError(f"HTTP {response.status_code}", reason=f"HTTP {response.status_code}")
            return response.json()["total"] >= 1

        return match, http.aclose

    async def _rpc(self):
        manager = ApiClient.connect(self.cluster.configs["A"])
        client = await manager.__aenter__()

        async def close() -> None:
            await manager.__aexit__(None, None, None)

        return client, close

    async def rpc_read(self, k: int):
        client, close = await self._rpc()

        async def read(rng: random.Random) -> bool:
            row = rng.choice(self.records)
            pulled = await client.call("records.pull", record_id=row["record_id"], purpose="treatment", timeout=60)
            return bool(pulled.get("verified"))

        return read, close

    async def rpc_match(self, k: int):
        client, close = await self._rpc()

        async def match(rng: random.Random) -> bool:
            found = await client.call("empi.lookup", patient=rng.choice(self.patients))
            return found["empi"] is not None

        return match, close


async def measure(cluster: LocalConsortium, args: argparse.Namespace) -> dict:
    await cluster.wait_ready(timeout=60)
    people = synthetic.people(args.patients, seed=5)
    rows, patients, height = [], [], 0
    for name in OWNERS:
        resources = [r for p in people for r in synthetic.patient_resources(p, name, visits=2, seed=5)]
        patients += [r for r in resources if r["resourceType"] == "Patient"]
        recorded = await record(cluster, name, [fhir.Item(f"bench:{name}:{i}", r) for i, r in enumerate(resources)])
        rows += [r for r in recorded if r["resource_type"] != "Patient"]
        height = max(height, *(r["height"] for r in recorded))
    await cluster.wait_height(["A"], height)
    base = (await cluster.status("A"))["fhir"]
    doors = Doors(cluster, base, rows, patients)
    phases: list[tuple[str, Callable]] = [("fhir_read", doors.fhir_read), ("rpc_read", doors.rpc_read),
                                          ("fhir_match", doors.fhir_match), ("rpc_match", doors.rpc_match)]
    figures: dict = {"records": len(rows), "patients": len(patients), "concurrency": args.concurrency}
    for name, make in phases:
        await run_clients(cluster, make, 2, 1.0)  # warm up
        figures[name] = await run_clients(cluster, make, args.concurrency, args.seconds)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients of member A")
    parser.add_argument("--patients", type=int, default=20, help="synthetic patients recorded at B and at C")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = on_fresh_consortium("ehrnode-fhir-", measure, args)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"cluster: 4 members on loopback with TLS, {figures['cores']} cores; {figures['records']} records of "
          f"{figures['patients']} patients at B and C; {figures['concurrency']} clients of A")
    for label, fhir_key, rpc_key in (("reads (verified pulls)", "fhir_read", "rpc_read"),
                                     ("Patient/$match", "fhir_match", "rpc_match")):
        for door, key in (("FHIR REST", fhir_key), ("JSON-RPC ", rpc_key)):
            f = figures[key]
            print(f"{label:<23} {door} {f['per_s']:>8}/s  p50 {f['p50_ms']} ms  p99 {f['p99_ms']} ms  "
                  f"CPU of A {f['cpu_a']}  errors {f['errors'] or 'none'}")


if __name__ == "__main__":
    main()
