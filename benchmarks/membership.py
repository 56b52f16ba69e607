"""What a change of membership costs on a four-member consortium on loopback.

Starts four `ehrnode run` processes, commits a history of signed notes, then:

* **add**: a fifth member is proposed and voted in; measured: from the deciding vote to its
  commit, and the gap between the block that adopts the change and the first block of the
  next consensus epoch (against the median gap between blocks before it);
* **join**: the new member's node is started only after the vote, from the founding genesis;
  measured: how long it takes to fetch, verify and apply the whole history (blocks and
  transactions per second) and start voting;
* **remove**: one member is voted out; the same two figures as for add.

    python benchmarks/membership.py [--history 5000] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ehrnode.localnet import LocalConsortium as Cluster

BATCH = 500


async def history(cluster: Cluster, count: int) -> int:
    """Commit ``count`` notes; the height of the last."""
    pending: list[str] = []
    for start in range(0, count, BATCH):
        result = await cluster.call("A", "tx.submit_batch", notes=[f"history {i}" for i in range(
            start, min(count, start + BATCH))])
        pending.extend(result["tx_ids"])
    heights = await cluster.call("A", "txs.wait", tx_ids=pending, timeout=120)
    missing = [t for t, h in heights["heights"].items() if h is None]
    if missing:
        raise SystemExit(f"{len(missing)} history transactions did not commit")
    return max(heights["heights"].values())


async def block_time(cluster: Cluster, member: str, height: int, timeout: float = 60.0) -> int:
    with trio.fail_after(timeout):
        while True:
            try:
                return (await cluster.call(member, "block.get", height=height, ids=True))["time"]
            except Exception:  # noqa: BLE001 - not committed yet
                await trio.sleep(0.05)


async def change(cluster: Cluster, proposer: str, voters: list[str], **proposal: str) -> dict[str, float]:
    proposed = await cluster.call(proposer, "consortium.propose", **proposal)
    pid = proposed["proposal"]["id"]
    for voter in voters[:-1]:
        await cluster.call(voter, "consortium.vote", proposal=pid)
    started = time.perf_counter()
    decided = await cluster.call(voters[-1], "consortium.vote", proposal=pid)
    vote_to_commit = time.perf_counter() - started
    adopted = decided["proposal"]["decided"]
    before = [await block_time(cluster, proposer, h) for h in range(max(1, adopted - 20), adopted + 1)]
    last, first_next = before[-1], await block_time(cluster, proposer, adopted + 1)
    return {"vote_to_commit_ms": vote_to_commit * 1000, "epoch_gap_ms": float(first_next - last),
            "usual_gap_ms": float(statistics.median(b - a for a, b in zip(before, before[1:], strict=False))),
            "adopted_at": adopted}


async def main(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="ehrnode-membership-") as tmp:
        cluster = Cluster(Path(tmp) / "consortium")
        cluster.start_all()
        try:
            await cluster.wait_ready()
            head = await history(cluster, args.history)
            config = cluster.new_member("D")
            member = json.loads((config.path.parent / "member.json").read_text())
            added = await change(cluster, "A", ["B", "C"], change="add", reason="benchmark", **member)
            await history(cluster, 200)  # a few blocks in the new epoch before D comes up
            started = time.perf_counter()
            cluster.start("D")
            with trio.fail_after(600):
                while True:
                    status = await cluster.status("D")
                    if status and status["validator"] and status["ledger"]["applied"] >= added["adopted_at"]:
                        break
                    await trio.sleep(0.05)
            join_s = time.perf_counter() - started
            applied = status["ledger"]["applied"]
            removed = await change(cluster, "A", ["B", "D", "R"], change="remove", name="C", reason="benchmark")
            return {
                "history_txs": args.history, "history_blocks": head,
                "add": added, "remove": removed,
                "join": {"seconds": join_s, "blocks": applied, "blocks_per_s": applied / join_s,
                         "txs_per_s": (args.history + 200) / join_s},
            }
        finally:
            cluster.stop_all()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--history", type=int, default=5000, help="notes committed before the changes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = trio.run(main, args)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"history: {result['history_txs']} notes in {result['history_blocks']} blocks")
        for name in ("add", "remove"):
            r = result[name]
            print(f"{name:>6}: deciding vote committed in {r['vote_to_commit_ms']:.0f} ms; gap at the epoch change "
                  f"{r['epoch_gap_ms']:.0f} ms (usual gap between blocks {r['usual_gap_ms']:.0f} ms)")
        j = result["join"]
        print(f"  join: new member fetched, verified and applied {j['blocks']} blocks in {j['seconds']:.2f} s "
              f"({j['blocks_per_s']:.0f} blocks/s, {j['txs_per_s']:.0f} tx/s) and votes")
