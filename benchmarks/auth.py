"""Local API authentication: what a credential check costs, and how fast anyone can guess.

Starts four `ehrnode run` processes from a fresh `consortium init`, adds users at A, then:

* connections: `--connections` sequential connect + `users.whoami` + close as a clinician
  (the full handshake with its credential check), reported per second and p50/p99;
* calls: `--calls` sequential `users.whoami` calls on one open connection (each re-checks the
  user and their role), per second;
* guessing: for `--seconds`, one client guesses one user's credential as fast as the node
  answers, another guesses naming no user, and `--parallel` more guess at once, each under a
  name of its own; reported: attempts per minute (the rate the throttle allows) and how they
  were refused; meanwhile another user connects once a second with the right credential.

    python benchmarks/auth.py [--connections 300] [--calls 2000] [--seconds 30] [--parallel 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ehrnode.client import ApiClient, ApiError
from ehrnode.localnet import LocalConsortium


def percentile(sorted_ms: list[float], q: float) -> float | None:
    return round(sorted_ms[int(q * (len(sorted_ms) - 1))], 2) if sorted_ms else None


async def connections(cluster: LocalConsortium, credential: str, count: int) -> dict:
    config = cluster.configs["A"]
    times = []
    start = time.perf_counter()
    for _ in range(count):
        sent = time.perf_counter()
        async with ApiClient.connect(config, user="dr.ana", credential=credential) as client:
            await client.call("users.whoami")
        times.append(1000 * (time.perf_counter() - sent))
    elapsed = time.perf_counter() - start
    times.sort()
    return {"connections": count, "per_s": round(count / elapsed, 1), "p50_ms": percentile(times, 0.5),
            "p99_ms": percentile(times, 0.99)}


async def calls(cluster: LocalConsortium, credential: str, count: int) -> dict:
    async with ApiClient.connect(cluster.configs["A"], user="dr.ana", credential=credential) as client:
        start = time.perf_counter()
        for _ in range(count):
            await client.call("users.whoami")
        elapsed = time.perf_counter() - start
    return {"calls": count, "per_s": round(count / elapsed, 1), "mean_ms": round(1000 * elapsed / count, 3)}


async def guessing(cluster: LocalConsortium, bystander: str, seconds: float, parallel: int) -> dict:
    config = cluster.configs["A"]
    outcomes: dict[str, Counter[str]] = {"named": Counter(), "unnamed": Counter(), "parallel": Counter()}
    bystander_ok: list[float] = []
    deadline = time.perf_counter() + seconds

    async def guess(kind: str, user: str | None) -> None:
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            try:
                async with ApiClient.connect(config, user=user, credential=f"ehr_guess{n:012d}"):
                    outcomes[kind]["accepted"] += 1
            except ApiError as exc:
                outcomes[kind][exc.reason] += 1

    async def bystand() -> None:
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            async with ApiClient.connect(config, user="dr.bo", credential=bystander) as client:
                await client.call("users.whoami")
            bystander_ok.append(1000 * (time.perf_counter() - sent))
            await trio.sleep(1)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(guess, "named", "dr.ana")
        nursery.start_soon(guess, "unnamed", None)
        for k in range(parallel):
            nursery.start_soon(guess, "parallel", f"sprayed{k}")
        nursery.start_soon(bystand)
    elapsed = time.perf_counter() - start
    report = {"seconds": round(elapsed, 1), "parallel_guessers": parallel}
    for kind, counts in outcomes.items():
        attempts = sum(counts.values())
        report[kind] = {"attempts": attempts, "per_minute": round(60 * attempts / elapsed, 1),
                        "refused_401": counts["unauthorized"], "refused_429": counts["throttled"],
                        "gave_up": attempts - counts["unauthorized"] - counts["throttled"] - counts["accepted"],
                        "accepted": counts["accepted"]}
    bystander_ok.sort()
    report["bystander"] = {"connections": len(bystander_ok), "p50_ms": percentile(bystander_ok, 0.5),
                           "max_ms": round(bystander_ok[-1], 1) if bystander_ok else None}
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--parallel", type=int, default=32, help="guessers spraying distinct names at once")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ehrnode-bench-auth-") as tmp:
        cluster = LocalConsortium(Path(tmp) / "consortium")
        cluster.start_all()
        try:
            trio.run(cluster.wait_ready)
            ana = trio.run(lambda: cluster.call("A", "users.add", name="dr.ana", role="clinician"))["credential"]
            bo = trio.run(lambda: cluster.call("A", "users.add", name="dr.bo", role="clinician"))["credential"]
            report = {
                "connections": trio.run(connections, cluster, ana, args.connections),
                "calls": trio.run(calls, cluster, ana, args.calls),
                "guessing": trio.run(guessing, cluster, bo, args.seconds, args.parallel),
            }
        finally:
            cluster.stop_all()
    if args.json:
        print(json.dumps(report))
        return 0
    c, k, g = report["connections"], report["calls"], report["guessing"]
    print(f"connect + whoami + close: {c['per_s']} /s (p50 {c['p50_ms']} ms, p99 {c['p99_ms']} ms)")
    print(f"calls on one connection:  {k['per_s']} /s ({k['mean_ms']} ms each, role re-checked per call)")
    for kind, what in (("named", "one guesser naming dr.ana"), ("unnamed", "one guesser naming nobody"),
                       ("parallel", f"{g['parallel_guessers']} guessers, each its own name")):
        r = g[kind]
        print(f"guessing, {what}, {g['seconds']} s: {r['attempts']} attempts ({r['per_minute']}/min): "
              f"{r['refused_401']} refused 401, {r['refused_429']} refused 429, {r['gave_up']} gave up waiting, "
              f"{r['accepted']} accepted")
    b = g["bystander"]
    print(f"another user meanwhile: {b['connections']} connections, p50 {b['p50_ms']} ms, max {b['max_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
