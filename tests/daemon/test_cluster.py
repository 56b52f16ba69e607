"""Four real node processes on loopback, driven through their local APIs."""

import json
from itertools import pairwise
from pathlib import Path

import trio

from ehrnode.client import ApiClient


async def submit_many(cluster, names, count, prefix):
    """Submit ``count`` notes round-robin over ``names``; returns the tx ids."""
    ids = []

    async def worker(name, share):
        async with ApiClient.connect(cluster.configs[name]) as client:
            for k in share:
                result = await client.call("tx.submit", note=f"{prefix}-{k}")
                ids.append(result["tx_id"])

    async with trio.open_nursery() as nursery:
        for i, name in enumerate(names):
            nursery.start_soon(worker, name, range(i, count, len(names)))
    return ids


async def committed_txs(cluster, name, height):
    txs = []
    async with ApiClient.connect(cluster.configs[name]) as client:
        for h in range(1, height + 1):
            txs.extend(tx["id"] for tx in (await client.call("block.get", height=h))["txs"])
    return txs


async def wait_all_committed(cluster, names, ids, timeout=120.0):
    wanted = set(ids)
    with trio.fail_after(timeout):
        while True:
            heights = [await cluster.height(n) for n in names]
            if set(await committed_txs(cluster, names[0], min(heights))) >= wanted:
                return min(heights)
            await trio.sleep(0.5)


async def test_four_nodes_commit_500_transactions_in_the_same_order(cluster):
    cluster.start_all()
    await cluster.wait_ready()
    ids = await submit_many(cluster, cluster.names, 500, "load")
    assert len(set(ids)) == 500
    height = await wait_all_committed(cluster, cluster.names, ids)
    chains = {n: await cluster.chain(n, height) for n in cluster.names}
    assert len({tuple(c) for c in chains.values()}) == 1, "nodes disagree on the chain"
    orders = {n: await committed_txs(cluster, n, height) for n in cluster.names}
    assert len({tuple(o) for o in orders.values()}) == 1
    committed = orders["A"]
    assert len(committed) == len(set(committed))  # each transaction once
    assert set(ids) <= set(committed)


async def test_kill_9_of_a_validator_under_load_and_restart_converges(cluster):
    cluster.start_all()
    await cluster.wait_ready()
    await submit_many(cluster, ["A", "B"], 40, "before")
    cluster.kill9("C")
    start = await cluster.height("A")
    ids = await submit_many(cluster, ["A", "B", "R"], 60, "during")
    await cluster.wait_height(["A", "B", "R"], start + 3)
    cluster.start("C")
    target = await cluster.height("A")
    await cluster.wait_height(["C"], target, timeout=60)
    await wait_all_committed(cluster, ["A", "C"], ids)
    common = min([await cluster.height(n) for n in cluster.names])
    chains = {n: await cluster.chain(n, common) for n in cluster.names}
    assert len({tuple(c) for c in chains.values()}) == 1
    assert "node.started" in cluster.log("C")


async def test_killing_the_leader_repeatedly_does_not_stop_commits(cluster):
    cluster.start_all()
    await cluster.wait_ready()
    names = cluster.names
    for _ in range(3):
        status = await cluster.status("A")
        leader = names[(status["round"]) % len(names)]
        victim = leader if leader != "A" else "B"
        before = await cluster.height("A")
        cluster.kill9(victim)
        live = [n for n in names if n != victim]
        await submit_many(cluster, live, 10, f"leader-{victim}")
        await cluster.wait_height(live, before + 2, timeout=60)
        cluster.start(victim)
        await cluster.wait_ready(timeout=30)
    final = min([await cluster.height(n) for n in names])
    chains = {n: await cluster.chain(n, final) for n in names}
    assert len({tuple(c) for c in chains.values()}) == 1


async def test_a_validator_that_is_down_stops_being_handed_rounds(cluster):
    # Round robin would give the dead validator every fourth round, each ending in a timeout (a
    # gap in the rounds of the chain); leader reputation leaves it out once the last 2n blocks
    # no longer show it. Counted on the chain, not timed.
    cluster.start_all()
    await cluster.wait_ready()
    cluster.kill9("C")
    live = ["A", "B", "R"]
    start = await cluster.height("A")
    await cluster.wait_height(live, start + 16, timeout=90)  # two windows of history without C
    settled = await cluster.height("A")
    await submit_many(cluster, live, 30, "without-C")
    await cluster.wait_height(live, settled + 17, timeout=90)
    async with ApiClient.connect(cluster.configs["A"]) as client:
        blocks = [await client.call("block.get", height=h) for h in range(settled, settled + 17)]
    gaps = [b["round"] for a, b in pairwise(blocks) if b["round"] != a["round"] + 1]
    assert len(gaps) <= 1, f"rounds handed to a validator that is down: {gaps}"
    assert "C" not in {b["author"] for b in blocks}
    # Until then, its rounds were given up as soon as they came, its connections being closed.
    skipped = [json.loads(line) for name in live for line in cluster.log(name).splitlines()
               if '"round.skipped"' in line]
    assert 2 in {event["unreachable"] for event in skipped}  # C, the third validator


async def test_two_of_four_down_stalls_without_crashing_and_resumes(cluster):
    cluster.start_all()
    await cluster.wait_ready()
    cluster.stop("C")
    cluster.stop("R")
    stalled = await cluster.height("A")
    with trio.fail_after(30):  # until what was certified before the stop has committed
        while True:
            await trio.sleep(1.0)
            if (now := await cluster.height("A")) == stalled:
                break
            stalled = now
    async with ApiClient.connect(cluster.configs["A"]) as client:
        result = await client.call("tx.submit", note="while-stalled")
    await trio.sleep(4.0)
    assert await cluster.height("A") <= stalled + 1  # at most a block certified before the stop
    assert (await cluster.status("B")) is not None  # still up
    cluster.start("C")
    cluster.start("R")
    await cluster.wait_ready(timeout=30)
    await wait_all_committed(cluster, cluster.names, [result["tx_id"]], timeout=90)


async def test_a_member_that_hangs_is_closed_out_and_welcomed_back_when_it_runs_again(cluster):
    """A stopped process keeps its sockets open and answers nothing: once it has been silent for
    SILENT_TIMEOUT (no message, no answered ping), the others close its connections, as they would
    a crashed member's, and commit without it; running again, it reconnects and catches up."""
    import signal

    from ehrnode.net.peers import SILENT_TIMEOUT

    cluster.start_all()
    await cluster.wait_ready()
    live = ["A", "B", "R"]
    hung = cluster.procs["C"]
    hung.send_signal(signal.SIGSTOP)
    try:
        with trio.fail_after(SILENT_TIMEOUT + 30):
            while True:
                peers = [(await cluster.status(name))["peers"] for name in live]
                if all("C" not in p for p in peers):
                    break
                await trio.sleep(0.5)
        ids = await submit_many(cluster, live, 12, "while-C-hangs")
        await wait_all_committed(cluster, live, ids, timeout=60)
    finally:
        hung.send_signal(signal.SIGCONT)
    closed = [json.loads(line) for name in live for line in cluster.log(name).splitlines()
              if '"peer.unresponsive"' in line]
    assert {event["peer"] for event in closed} == {"C"}
    assert all(event["silent"] >= SILENT_TIMEOUT for event in closed)
    await cluster.wait_ready(timeout=60)
    await wait_all_committed(cluster, ["C"], ids, timeout=60)


def stat(pid):
    """(state, parent pid) of a process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1])


def alive(pid):
    found = stat(pid)
    return found is not None and found[0] != "Z"  # a zombie has ended, whoever is to reap it


def children(pid):
    """The live processes whose parent is ``pid``."""
    return [int(p.name) for p in Path("/proc").glob("[0-9]*") if (found := stat(p.name)) is not None
            and found[1] == pid and found[0] != "Z"]


async def test_sigterm_stops_cleanly_and_takes_the_record_workers_with_it(cluster):
    cluster.start_all()
    await cluster.wait_ready()
    institutions = [n for n in cluster.names if n != "R"]
    # Each institution starts its record workers once it listens; R records nothing.
    await cluster.wait_settled()
    assert all("records.workers_started" in cluster.log(name) for name in institutions)
    assert [(await cluster.call(name, "status"))["oprf"]["held"] for name in institutions] == [0, 0, 0]
    assert "records.workers_started" not in cluster.log("R")
    workers = {name: children(cluster.procs[name].pid) for name in cluster.names}
    assert all(workers[name] for name in institutions) and not workers["R"]
    for name in list(cluster.names):
        assert cluster.stop(name) == 0
        assert '"node.stopped"' in cluster.log(name)
    # Its children (the workers, and the resource tracker their pool starts) end with it: at
    # once, or (the tracker reads its parent's end) a moment later.
    with trio.move_on_after(10):
        while any(alive(pid) for pids in workers.values() for pid in pids):
            await trio.sleep(0.1)
    assert not [pid for pids in workers.values() for pid in pids if alive(pid)]
