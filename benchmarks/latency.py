"""Where commit latency goes at light load: one transaction at a time, traced through the nodes' logs.

Starts four `ehrnode run` members on loopback with debug logs, then submits note
transactions one at a time through member A's API (``tx.submit`` with ``wait``, as
``ehrnode tx submit --wait`` does), pausing between them so each meets a quiet chain. For
each transaction it reads, from the
client's clock and the members' logs (one machine, one clock):

* ``submit``: the API call until the transaction is signed, sealed and admitted (the
  answer carries its id; the client's wait goes on until the commit);
* ``to_proposal``: from then until the leader proposes the block that carries it
  (gossip to the leader, the round in progress, any pacing);
* ``certify``: from that proposal until the proposal of the block after it (the block
  is certified by the votes the next leader collects);
* ``commit``: from there until member A commits the block (2-chain: a certificate for
  the child commits the parent);
* ``notify``: from A's commit until the client's wait returns.

    python benchmarks/latency.py [--count 40] [--gap 0.25] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ehrnode.client import ApiClient
from ehrnode.localnet import LocalConsortium

STAGES = ("submit", "to_proposal", "certify", "commit", "notify", "total")


def _stamp(line: dict) -> float:
    return datetime.datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()


def read_logs(cluster: LocalConsortium) -> tuple[dict[int, float], dict[int, float]]:
    """When each height was first proposed (by whichever member led), and when A committed it."""
    proposed: dict[int, float] = {}
    committed: dict[int, float] = {}
    for name in cluster.names:
        for raw in cluster.log_path(name).read_text().splitlines():
            if not raw.startswith("{"):
                continue
            line = json.loads(raw)
            event = line.get("event")
            if event == "block.proposed":
                height = line["height"]
                proposed[height] = min(proposed.get(height, float("inf")), _stamp(line))
            elif event == "block.committed" and name == "A":
                committed.setdefault(line["height"], _stamp(line))
    return proposed, committed


async def trace(cluster: LocalConsortium, count: int, gap: float) -> list[dict[str, float]]:
    await cluster.call("A", "tx.submit", note="warm-up", wait=True, timeout=60)
    samples = []
    async with ApiClient.connect(cluster.configs["A"]) as client:
        for k in range(count):
            await trio.sleep(gap)
            start = time.time()
            result = await client.call("tx.submit", note=f"traced {k}", wait=True, timeout=30)
            samples.append({"start": start, "done": time.time(), "height": result["height"]})
    # The API answers once, after the commit; the admission time is read from a call without wait.
    async with ApiClient.connect(cluster.configs["A"]) as client:
        for sample in samples[: min(10, len(samples))]:
            began = time.time()
            await client.call("tx.submit", note="admission")
            sample["admitted_in"] = time.time() - began
    return samples


def breakdown(samples: list[dict[str, float]], proposed: dict[int, float],
              committed: dict[int, float]) -> dict[str, dict[str, float]]:
    admission = statistics.median(s["admitted_in"] for s in samples if "admitted_in" in s)
    stages: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for s in samples:
        h = int(s["height"])
        if h not in proposed or h + 1 not in proposed or h not in committed:
            continue
        admitted = s["start"] + admission
        stages["submit"].append(admission)
        stages["to_proposal"].append(proposed[h] - admitted)
        stages["certify"].append(proposed[h + 1] - proposed[h])
        stages["commit"].append(committed[h] - proposed[h + 1])
        stages["notify"].append(s["done"] - committed[h])
        stages["total"].append(s["done"] - s["start"])
    return {stage: {"p50_ms": round(1000 * statistics.median(v), 1),
                    "p90_ms": round(1000 * sorted(v)[int(0.9 * (len(v) - 1))], 1)}
            for stage, v in stages.items() if v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=40, help="transactions traced")
    parser.add_argument("--gap", type=float, default=0.25, help="seconds between one commit and the next submit")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalConsortium(Path(tmp) / "consortium")
        for name in cluster.names:
            path = cluster.configs[name].path
            path.write_text(path.read_text().replace('log_level = "info"', 'log_level = "debug"'))
        cluster.start_all()
        try:
            trio.run(cluster.wait_ready)
            trio.run(cluster.wait_settled)  # not while the members do their once-after-a-start work
            samples = trio.run(trace, cluster, args.count, args.gap)
        finally:
            cluster.stop_all()
        result = breakdown(samples, *read_logs(cluster))
    if args.json:
        print(json.dumps(result))
        return
    print(f"one transaction at a time through member A ({args.count}, {args.gap}s apart), 4 members on loopback:")
    for stage, figures in result.items():
        print(f"  {stage:<12} p50 {figures['p50_ms']:>7} ms   p90 {figures['p90_ms']:>7} ms")


if __name__ == "__main__":
    main()
