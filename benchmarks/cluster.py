"""A four-member consortium on loopback under load offered from this (separate) process.

Starts four `ehrnode run` processes from a fresh `consortium init`, then offers signed
256-byte note transactions through the nodes' local APIs, round-robin over the members:

* at fixed rates (default 200 and 500 tx/s), measuring commit latency from submission to
  the `block.committed` notification of the block that holds the transaction;
* at saturation (as fast as the submitters go, 100 transactions per API call),
  measuring committed tx/s.

* sequentially, one transaction at a time waiting for its commit (as `tx submit --wait`),
  giving the median and p90 round trip.

With ``--down N`` it then kills N validators (SIGKILL, the last members, never the first
round's leader nor the member whose notifications are watched) and measures the same again
with them down, printed beside the all-up figures of the same run.

It also measures this machine's Ed25519 verifications per second and prints the bound
`cores x verify_per_s / validators` (each transaction is verified at least once per
validator) and the fraction of it reached.

With ``--down 1 --from-start`` the validator is killed as soon as the members are connected,
before the first commit, and only that is measured, saturation first: leader reputation has no
history then.

    python benchmarks/cluster.py [--duration 10] [--rates 200,500] [--down 1 [--from-start]] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ehrnode import crypto
from ehrnode.client import ApiClient
from ehrnode.localnet import LocalConsortium as Cluster

NOTE_BYTES = 256 - 160  # the note text; with the envelope and signature a transaction is ~256 bytes


def verify_rate(seconds: float = 1.0) -> float:
    crypto.set_verify_cache(0)
    ident = crypto.Identity.generate()
    msgs = [os.urandom(64) for _ in range(256)]
    sigs = [ident.sign(m) for m in msgs]
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for m, s in zip(msgs, sigs, strict=False):
            crypto.verify(ident.public_key, m, s)
        count += len(msgs)
    return count / (time.perf_counter() - start)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Load:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        #: The members load is offered to (the ones up).
        self.names = list(cluster.names)
        self.submitted: dict[str, float] = {}
        self.committed: dict[str, float] = {}
        self.refused = 0
        #: Blocks committed (as member A sees them), each with the time of its notification.
        self.blocks: list[float] = []

    async def watch(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Record when each transaction's block is committed, as seen by member A."""
        async with ApiClient.connect(self.cluster.configs["A"]) as sub, \
                ApiClient.connect(self.cluster.configs["A"]) as fetch:
            await sub.call("blocks.subscribe")
            task_status.started()
            async for note in sub.notifications():
                now = time.perf_counter()
                self.blocks.append(now)
                if note["params"]["txs"]:
                    block = await fetch.call("block.get", height=note["params"]["height"], ids=True)
                    for tx in block["txs"]:
                        self.committed.setdefault(tx["id"], now)

    async def offer(self, rate: float | None, seconds: float, workers: int, batch: int = 1) -> float:
        """Submit for ``seconds`` at ``rate`` tx/s in all (None: as fast as possible, ``batch`` per call)."""
        names = self.names
        deadline = time.perf_counter() + seconds
        interval = None if rate is None else workers / rate
        text = "x" * NOTE_BYTES

        async def worker(k: int) -> None:
            async with ApiClient.connect(self.cluster.configs[names[k % len(names)]]) as client:
                next_at = time.perf_counter() + (0 if interval is None else interval * k / workers)
                while time.perf_counter() < deadline:
                    if interval is not None:
                        await trio.sleep_until(trio.current_time() + max(0.0, next_at - time.perf_counter()))
                        next_at += interval
                    sent = time.perf_counter()
                    if batch > 1:
                        result = await client.call("tx.submit_batch", notes=[f"{text}{i}" for i in range(batch)])
                        self.refused += len(result["errors"])
                        for tx_id in result["tx_ids"]:
                            if tx_id is not None:
                                self.submitted[tx_id] = sent
                        continue
                    try:
                        result = await client.call("tx.submit", note=text)
                    except Exception:  # noqa: BLE001 - mempool full under saturation: count and go on
                        self.refused += 1
                        continue
                    self.submitted[result["tx_id"]] = sent

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for k in range(workers):
                nursery.start_soon(worker, k)
        return time.perf_counter() - start


async def sequential(load: Load, count: int) -> dict:
    """Round trips of ``count`` transactions submitted one at a time, each waiting for its commit."""
    times = []
    for k in range(count):
        name = load.names[k % len(load.names)]
        start = time.perf_counter()
        await load.cluster.call(name, "tx.submit", note=f"sequential {k}", wait=True, timeout=60)
        times.append(1000 * (time.perf_counter() - start))
    times.sort()
    return {"count": count, "median_ms": round(statistics.median(times), 1),
            "p90_ms": round(times[int(0.9 * (len(times) - 1))], 1)}


async def phase(cluster: Cluster, load: Load, rates: list[float], seconds: float, waits: int,
                *, saturation_first: bool = False) -> dict:
    results: dict = {"fixed": []}
    if saturation_first:
        results["saturation"] = await saturation(cluster, load, seconds)
    results["sequential"] = await sequential(load, waits)
    procs = {n: p for n, p in cluster.procs.items() if n in load.names}
    for rate in rates:
        load.submitted.clear()
        cpu_before = {n: cpu_seconds(p.pid) for n, p in procs.items()}
        first = time.perf_counter()
        elapsed = await load.offer(rate, seconds, workers=8)
        cpu = {n: round((cpu_seconds(p.pid) - cpu_before[n]) / elapsed, 2) for n, p in procs.items()}
        blocks = sum(1 for t in load.blocks if first <= t <= first + elapsed)
        await trio.sleep(3.0)  # let the tail commit
        ids = list(load.submitted)
        latencies = sorted(1000 * (load.committed[i] - load.submitted[i]) for i in ids if i in load.committed)
        results["fixed"].append({
            "offered_tps": rate, "submitted": len(ids), "committed": len(latencies),
            "achieved_tps": round(len(ids) / elapsed, 1),
            "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
            "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))], 1) if latencies else None,
            "blocks_per_s": round(blocks / elapsed, 1), "cpu_per_node": cpu,
        })
    if not saturation_first:
        results["saturation"] = await saturation(cluster, load, seconds)
    return results


async def saturation(cluster: Cluster, load: Load, seconds: float) -> dict:
    load.submitted.clear()
    load.refused = 0
    procs = {n: p for n, p in cluster.procs.items() if n in load.names}
    cpu_before = {n: cpu_seconds(p.pid) for n, p in procs.items()}
    first = time.perf_counter()
    elapsed = await load.offer(None, seconds, workers=4, batch=100)
    end = first + elapsed
    cpu_after = {n: cpu_seconds(p.pid) for n, p in procs.items()}
    blocks = sum(1 for t in load.blocks if first <= t <= end)
    await trio.sleep(3.0)
    # Steady-state throughput: what was committed while the load was on, over that window
    # (the backlog left when the load stops does not count).
    ids = [i for i in load.submitted if i in load.committed and load.committed[i] <= end]
    latencies = sorted(1000 * (load.committed[i] - load.submitted[i]) for i in ids)
    return {
        "submitted": len(load.submitted), "committed": len(ids), "refused": load.refused,
        "committed_tps": round(len(ids) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
        "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))], 1) if latencies else None,
        "cpu_per_node": {n: round((cpu_after[n] - cpu_before[n]) / elapsed, 2) for n in cpu_after},
        "blocks_per_s": round(blocks / elapsed, 1),
    }


async def measure_young(cluster: Cluster, rates: list[float], seconds: float, down: int, waits: int) -> dict:
    """The same with the last ``down`` validators killed as soon as the members are connected,
    before the first commit: the chain is young, and leader reputation has no history yet."""
    killed = cluster.names[-down:]
    for name in killed:
        cluster.kill9(name)
    load = Load(cluster)
    load.names = [n for n in cluster.names if n not in killed]
    started = time.perf_counter()
    await cluster.call("A", "tx.submit", note="first", wait=True, timeout=120)
    first = time.perf_counter() - started
    async with trio.open_nursery() as nursery:
        await nursery.start(load.watch)
        # Saturation first, while the chain is still young.
        results = {"killed": killed, "first_commit_s": round(first, 2),
                   **await phase(cluster, load, rates, seconds, waits, saturation_first=True)}
        nursery.cancel_scope.cancel()
    return {"young": results}


async def measure(cluster: Cluster, rates: list[float], seconds: float, down: int, waits: int) -> dict:
    load = Load(cluster)
    # Warm up: the first rounds run while peers are still connecting.
    await cluster.call("A", "tx.submit", note="warm-up", wait=True, timeout=60)
    results: dict = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(load.watch)
        results["all_up"] = await phase(cluster, load, rates, seconds, waits)
        if down:
            killed = cluster.names[-down:]
            for name in killed:
                cluster.kill9(name)
            load.names = [n for n in cluster.names if n not in killed]
            results["down"] = {"killed": killed, **await phase(cluster, load, rates, seconds, waits)}
        nursery.cancel_scope.cancel()
    return results


def summarize(results: dict, bound: float) -> dict:
    sat = results["saturation"]
    low = results["fixed"][0] if results["fixed"] else {}
    return {
        "committed_tps": sat["committed_tps"], "p50_ms": low.get("p50_ms"), "p99_ms": low.get("p99_ms"),
        "sequential_median_ms": results["sequential"]["median_ms"],
        "fraction_of_bound": round(sat["committed_tps"] / bound, 3),
        "fixed_rates": {f"{int(r['offered_tps'])}": r for r in results["fixed"]}, "saturation": sat,
        "sequential": results["sequential"],
    }


def report(title: str, results: dict, summary: dict) -> None:
    print(title)
    seq = results["sequential"]
    print(f"  sequential --wait: median {seq['median_ms']} ms, p90 {seq['p90_ms']} ms ({seq['count']} transactions)")
    for r in results["fixed"]:
        print(f"  offered {r['offered_tps']:>6.0f} tx/s: achieved {r['achieved_tps']} tx/s, committed "
              f"{r['committed']}/{r['submitted']}, latency p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms; "
              f"{r['blocks_per_s']} blocks/s, CPU per node {r['cpu_per_node']}")
    sat = results["saturation"]
    print(f"  saturation: {sat['committed_tps']} committed tx/s (p50 {sat['p50_ms']} ms, p99 {sat['p99_ms']} ms, "
          f"{sat['refused']} refused), {sat['blocks_per_s']} blocks/s, CPU per node {sat['cpu_per_node']}; "
          f"{summary['fraction_of_bound']:.1%} of the "
          f"verification bound")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per measurement")
    parser.add_argument("--rates", default="200,500", help="fixed offered rates, tx/s, comma-separated")
    parser.add_argument("--down", type=int, default=0, choices=(0, 1), help="validators to kill for a second pass")
    parser.add_argument("--waits", type=int, default=30, help="sequential transactions waited for, per pass")
    parser.add_argument("--from-start", action="store_true",
                        help="with --down: kill them before the first commit and measure only that (a young chain)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r]

    verify_per_s = verify_rate()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp) / "consortium")
        cluster.start_all()
        try:
            trio.run(cluster.wait_ready)
            from_start = args.from_start and args.down
            if not from_start:
                # Measured from steady state: not while the members make their first OPRF key and
                # start their record workers (seconds of CPU on every core, once after a start).
                trio.run(cluster.wait_settled)
            results = trio.run(measure_young if from_start else measure, cluster, rates, args.duration, args.down,
                               args.waits)
        finally:
            cluster.stop_all()
    bound = cores * verify_per_s / len(cluster.names)
    summary = {"verify_per_s": round(verify_per_s), "cores": cores, "verify_bound_tps": round(bound)}
    young = results.get("young")
    if young is not None:
        summary.update(first_commit_s=young["first_commit_s"], **summarize(young, bound))
    else:
        summary.update(summarize(results["all_up"], bound))
    if "down" in results:
        down = summarize(results["down"], bound)
        summary["down"] = {
            "killed": results["down"]["killed"], **down,
            "tps_vs_all_up": round(down["committed_tps"] / summary["committed_tps"], 3),
            "sequential_vs_all_up": round(down["sequential_median_ms"] / summary["sequential_median_ms"], 2),
        }
    if args.json:
        print(json.dumps(summary))
    elif young is not None:
        print(f"cluster: 4 members on loopback, {cores} cores; {', '.join(young['killed'])} killed before the first "
              f"commit; the first commit came {summary['first_commit_s']} s after")
        report("young chain, one down from the start:", young, summary)
    else:
        print(f"cluster: 4 members on loopback, {cores} cores, ~256-byte signed note transactions; Ed25519 verify "
              f"{verify_per_s:,.0f}/s per core, bound {cores} x {verify_per_s:,.0f} / 4 = {bound:,.0f} tx/s")
        report("all up:", results["all_up"], summary)
        if "down" in results:
            report(f"{', '.join(results['down']['killed'])} down:", results["down"], summary["down"])
            print(f"  with {args.down} down: {summary['down']['tps_vs_all_up']:.0%} of the all-up committed tx/s, "
                  f"sequential median x{summary['down']['sequential_vs_all_up']}")

if __name__ == "__main__":
    main()
