"""Governed membership on real consortia: a member removed by vote is refused and reads no later
epoch; a member added by vote syncs, verifies from genesis and takes part; a validator crash
during a change; a member's keys replaced by vote; a member handed a bad copy of an epoch key
gets it sealed again."""

import json
import sqlite3
import subprocess
import sys

import trio

from ehrnode import crypto, synthetic
from ehrnode.client import ApiClient
from ehrnode.config import load_genesis
from ehrnode.epochs import EpochGrant, EpochKeys
from ehrnode.errors import KeyUnavailable
from ehrnode.ledger.block_store import SqliteBlockStore
from ehrnode.ledger.envelope import Envelope, public_key
from ehrnode.ledger.state import LedgerState
from ehrnode.ledger.transactions import Transaction
from ehrnode.membership import Membership
from ehrnode.net.protocol import Hello, TxFrame, encode_frame
from ehrnode.records.fhir import Item
from ehrnode.records.submit import add_items
from ehrnode.records.vault import EntryHeader

from .test_bad_peers import closed, handshake_as, open_peer, wait_log

#: The hostile peers here speak the wire protocol in clear; test_tls.py covers TLS.
PLAINTEXT = True


async def notes(cluster, member, count, prefix):
    heights = []
    for i in range(count):
        result = await cluster.call(member, "tx.submit", note=f"{prefix} {i}", wait=True)
        heights.append(result["height"])
    return heights


async def wait_for(predicate, timeout=60.0, step=0.2):
    with trio.fail_after(timeout):
        while True:
            value = await predicate()
            if value:
                return value
            await trio.sleep(step)


async def test_a_removed_member_is_refused_and_cannot_read_later_epochs(cluster):
    cluster.start_all()
    await cluster.wait_ready()
    await notes(cluster, "A", 2, "before")
    proposed = await cluster.call("A", "consortium.propose", change="remove", name="C", reason="left the network")
    proposal = proposed["proposal"]
    assert proposal["status"] == "open" and proposal["needed"] == 3 and proposal["voters"] == ["A"]
    await cluster.call("B", "consortium.vote", proposal=proposal["id"])
    decided = await cluster.call("R", "consortium.vote", proposal=proposal["id"])
    assert decided["proposal"]["status"] == "adopted"
    adopted_at = decided["proposal"]["decided"]

    # The remaining three go on, and the key is rotated at once, sealed to them only.
    async def rotated():
        view = await cluster.call("B", "keys.status")
        return view["epochs"][-1] if view["epochs"][-1]["sealed_to"] == ["A", "B", "R"] else None
    epoch = await wait_for(rotated)
    assert epoch["starts"] > adopted_at
    after = await notes(cluster, "B", 3, "after")
    members = await cluster.call("A", "consortium.members")
    assert [m["name"] for m in members["members"]] == ["A", "B", "R"] and members["epoch"] == 1
    status = await cluster.call("A", "status")
    assert status["consensus_epoch"] == 1 and status["validators"] == 3 and "C" not in status["peers"]
    await wait_log(cluster, "C", '"reason": "refused:unknown_member"')  # C's operator is told why

    # C can no longer connect, though it holds its own key and genesis lists it.
    async with await open_peer(cluster, "R") as ws:
        await ws.send_message(encode_frame(Hello.fresh(cluster.genesis, "C")))
        await closed(ws)
    await wait_log(cluster, "R", '"reason": "unknown_member"')

    cluster.stop_all()
    # With a copy of B's stores, C's own keys open nothing after the rotation.
    config = cluster.configs["C"]
    c_keys = EpochKeys(cluster.genesis.chain_id, "C", crypto.SealingKey.load(config.sealing_key_path))
    c_keys.learn(load_genesis(config.genesis_path).epoch_key)
    b_data = cluster.configs["B"].data_dir
    state = LedgerState(b_data / "state.sqlite3", cluster.genesis.chain_id,
                        Membership(0, 0, cluster.genesis.members), keys=c_keys)
    store = SqliteBlockStore(b_data / "blocks.sqlite3", cluster.genesis.validators)
    try:
        assert epoch["epoch"] not in c_keys and "no copy" in c_keys.unreadable[epoch["epoch"]]
        sealed_later = [data for h in range(epoch["starts"], max(after) + 1)
                        for data in store.block_at(h).payload]
        assert sealed_later
        for data in sealed_later:
            try:
                state.open_envelope(data, after[-1])
            except KeyUnavailable:
                continue
            raise AssertionError("C opened an envelope of an epoch after it left")
    finally:
        store.close()
        state.close()


async def test_a_member_added_by_vote_syncs_verifies_from_genesis_and_takes_part(cluster):
    cluster.start_all()
    await cluster.wait_ready()
    await notes(cluster, "A", 3, "before D")
    rotated = await cluster.call("B", "keys.rotate")  # an epoch key D must be given too
    config = cluster.new_member("D")
    cluster.start("D")  # not a member yet: it follows what it can
    await wait_log(cluster, "D", '"membership.not_member"', timeout=60)  # a cold start beside four nodes
    member = json.loads((config.path.parent / "member.json").read_text())
    proposed = await cluster.call("A", "consortium.propose", change="add", reason="joins", **member)
    for voter in ("B", "C"):
        decided = await cluster.call(voter, "consortium.vote", proposal=proposed["proposal"]["id"])
    assert decided["proposal"]["status"] == "adopted"
    adopted_at = decided["proposal"]["decided"]

    # D catches up through the change and the key rotation that follows it (its own transaction,
    # committed a block or more later), holds every key, and applies the whole ledger.
    async def caught_up():
        status = await cluster.status("D")
        if not (status and status["validator"] and status["ledger"]["applied"] > adopted_at):
            return None
        keys = await cluster.call("D", "keys.status")
        # genesis, the rotation, the one at the change
        return (status, keys) if len(keys["epochs"]) >= rotated["epoch"] + 2 else None
    status, keys = await wait_for(caught_up, timeout=90)
    assert status["consensus_epoch"] == 1 and status["validators"] == 5 and status["ledger"]["stalled_at"] is None
    assert keys["unreadable"] == {} and all(e["held"] for e in keys["epochs"])
    first = await cluster.call("D", "block.get", height=1)
    assert first["author"] in ("A", "B", "C", "R")
    blocks = [await cluster.call("D", "block.get", height=h) for h in range(1, 6)]
    texts = [tx["body"].get("text") for block in blocks for tx in block["txs"]]
    assert "before D 0" in texts

    # D takes part: its transactions commit, and with one of the old members down the five still
    # make progress (4 of 5 is a quorum).
    await notes(cluster, "D", 2, "from D")
    cluster.kill9("C")
    heights = await notes(cluster, "B", 2, "C down")
    await cluster.wait_height(["A", "B", "D", "R"], heights[-1])
    chains = {name: await cluster.chain(name, heights[-1]) for name in ("A", "B", "D", "R")}
    assert len({tuple(c) for c in chains.values()}) == 1
    # The block D's node signs in turn comes from D.
    authors = {(await cluster.call("A", "block.get", height=h))["author"] for h in range(adopted_at + 1, heights[-1])}
    assert "D" in authors


async def test_a_validator_crashing_as_a_change_commits_comes_back_in_the_new_epoch(cluster):
    cluster.start_all()
    await cluster.wait_ready()
    config = cluster.new_member("D")
    member = json.loads((config.path.parent / "member.json").read_text())
    proposed = await cluster.call("A", "consortium.propose", change="add", reason="joins", **member)
    await cluster.call("B", "consortium.vote", proposal=proposed["proposal"]["id"])

    async def adopted():
        view = await cluster.call("A", "consortium.proposals", status="adopted")
        return view["proposals"]

    # C casts the deciding vote and is killed while it commits: as soon as A has committed the
    # change (C's vote is out; C is applying that block, or has just applied it). Killing C at a
    # fixed moment after its vote instead could land before the vote left it, on a busy machine.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: cluster.call("C", "consortium.vote", proposal=proposed["proposal"]["id"],
                                                timeout=60))
        [proposal] = await wait_for(adopted, timeout=30, step=0.005)
        cluster.kill9("C")
        nursery.cancel_scope.cancel()
    # Four of the five are needed now: A, B, R and D (started late, it catches up) go on while C is down.
    cluster.start("D")
    heights = await notes(cluster, "A", 2, "C down")
    await cluster.wait_height(["B", "D", "R"], heights[-1], timeout=90)
    cluster.start("C")  # from its own stores: whatever of the change it had committed
    await cluster.wait_ready(["A", "B", "C", "D", "R"], timeout=60)
    later = await notes(cluster, "C", 2, "C back")
    await cluster.wait_height(["A", "B", "C", "D", "R"], later[-1], timeout=60)
    chains = {name: await cluster.chain(name, later[-1]) for name in ("A", "B", "C", "D", "R")}
    assert len({tuple(c) for c in chains.values()}) == 1
    for name in ("C", "D"):
        status = await cluster.call(name, "status")
        assert status["consensus_epoch"] == 1 and status["validator"] and status["ledger"]["stalled_at"] is None
    assert proposal["decided"] < later[0]
    # A node restarted after the change rebuilds the new epoch's validators from its own stores.
    cluster.stop("A")
    cluster.start("A")
    await cluster.wait_ready(["A", "B", "C", "D", "R"], timeout=60)
    status = await cluster.call("A", "status")
    assert status["consensus_epoch"] == 1 and status["validators"] == 5 and status["validator"]
    final = await notes(cluster, "A", 2, "A back")
    await cluster.wait_height(["A", "B", "C", "D", "R"], final[-1], timeout=60)


async def test_a_member_with_a_bad_copy_of_an_epoch_key_gets_it_sealed_again(cluster):
    cluster.start_all()
    await cluster.wait_ready()
    # B, Byzantine, opens epoch 1 with a grant whose copy for R is not the key the check commits to.
    chain = cluster.genesis.chain_id
    sealing = {m.name: m.sealing_key for m in cluster.genesis.members}
    grant = EpochGrant.create(chain, 1, sealing)
    wrong = EpochGrant.create(chain, 1, {"R": sealing["R"]})
    bad = Transaction.create("keys.epoch", {**grant.body(), "sealed": {**grant.sealed, "R": wrong.sealed["R"]}},
                             chain_id=chain, submitter="B", time_ms=1,
                             identity=crypto.Identity.load(cluster.configs["B"].signing_key_path))
    envelope = Envelope.seal(bad, epoch=0, key=public_key(chain, 0), chain_id=chain)
    async with await open_peer(cluster, "R") as ws:  # B's own key, on a second connection of its own
        await handshake_as(cluster, ws, "B", crypto.Identity.load(cluster.configs["B"].signing_key_path))
        await ws.send_message(encode_frame(TxFrame((envelope.encoded,))))

    async def opened():
        view = await cluster.call("A", "keys.status")
        return view["current"] == 1
    await wait_for(opened, timeout=30)
    heights = await notes(cluster, "A", 3, "epoch one")
    # R stalled at the first envelope of epoch 1, asked, the others sealed their copy to it
    # again, and its ledger caught up.
    await wait_log(cluster, "R", '"ledger.stalled"', timeout=30)
    await wait_log(cluster, "R", '"keys.requested"', timeout=30)
    await wait_log(cluster, "R", '"ledger.resumed"', timeout=30)

    async def caught_up():
        status = await cluster.call("R", "status")
        return status if status["ledger"]["applied"] >= heights[-1] else None
    status = await wait_for(caught_up, timeout=30)
    assert status["ledger"]["stalled_at"] is None
    keys = await cluster.call("R", "keys.status")
    assert keys["unreadable"] == {} and all(e["held"] for e in keys["epochs"])
    block = await cluster.call("R", "block.get", height=heights[0])
    assert "epoch one 0" in [tx["body"].get("text") for tx in block["txs"]]


async def test_rotate_key_replaces_a_members_keys_by_vote(cluster):
    cluster.start_all()
    await cluster.wait_ready()
    await notes(cluster, "B", 2, "old keys")
    config = cluster.configs["B"]
    made = subprocess.run([sys.executable, "-m", "ehrnode.cli", "consortium", "new-keys", "--config", str(config.path),
                           "--out", str(config.path.parent / "next.json")], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    member = json.loads((config.path.parent / "next.json").read_text())
    old_key = {m["name"]: m for m in (await cluster.call("A", "consortium.members"))["members"]}["B"]["signing_key"]
    proposed = await cluster.call("A", "consortium.propose", change="rotate-key", reason="key rotation", **member)
    for voter in ("C", "R"):
        decided = await cluster.call(voter, "consortium.vote", proposal=proposed["proposal"]["id"])
    assert decided["proposal"]["status"] == "adopted"
    await cluster.wait_height(["A"], decided["proposal"]["decided"])
    listed = {m["name"]: m for m in (await cluster.call("A", "consortium.members"))["members"]}
    assert listed["B"]["signing_key"] == member["signing_key"] and listed["B"]["sealing_key"] == member["sealing_key"]
    # B's node takes its new keys as the change commits (the old ones kept, renamed) and signs again.
    await wait_log(cluster, "B", '"keys.replaced"', timeout=60)
    assert not (config.signing_key_path.parent / "signing.next.pem").exists()
    assert list(config.signing_key_path.parent.glob("signing.retired-*.pem"))
    heights = await notes(cluster, "B", 2, "new keys")
    await cluster.wait_height(["A", "B", "C", "R"], heights[-1])
    # Everything that signs for B signs with the new key at once: a record written now has its
    # vault entry and its anchor signed by it, never by the retired key.
    resources = synthetic.patient_resources(synthetic.people(1, seed=61)[0], "B", visits=1, seed=61)
    async with ApiClient.connect(config) as client:
        added = await add_items(client, [Item(f"in:{i}", r) for i, r in enumerate(resources)], timeout=60)
    assert added.records and all(added.heights.get(r["tx_id"]) for r in added.records)
    db = sqlite3.connect(f"file:{config.data_dir / 'vault.sqlite3'}?mode=ro", uri=True)
    try:
        header, signature = db.execute("SELECT header, signature FROM entries ORDER BY position DESC").fetchone()
    finally:
        db.close()
    signed = EntryHeader.from_wire(header).signed_bytes
    assert crypto.verify(bytes.fromhex(member["signing_key"]), signed, signature)
    assert not crypto.verify(bytes.fromhex(old_key), signed, signature)

    async def voting():
        status = await cluster.call("B", "status")
        return status if status["validator"] and status["consensus_epoch"] == 1 else None
    status = await wait_for(voting, timeout=30)
    assert status["ledger"]["stalled_at"] is None
    # The next epoch's key is sealed to B's new sealing key only: B opens it without a restart.
    rotated = await cluster.call("A", "keys.rotate")
    after = await notes(cluster, "B", 1, "next epoch")
    await cluster.wait_height(["B"], max(after[-1], rotated["starts"]))
    held = await cluster.call("B", "keys.status")
    assert held["unreadable"] == {} and all(e["held"] for e in held["epochs"])
    assert (await cluster.call("B", "status"))["ledger"]["stalled_at"] is None
    # Restarted, it starts with them; every epoch is readable, its records verify with either key.
    cluster.stop("B")
    cluster.start("B")
    await cluster.wait_ready(timeout=60)
    later = await notes(cluster, "B", 2, "after restart")
    await cluster.wait_height(["A", "B", "C", "R"], later[-1])
    keys = await cluster.call("B", "keys.status")
    assert keys["unreadable"] == {}
    chains = {name: await cluster.chain(name, later[-1]) for name in ("A", "B", "C", "R")}
    assert len({tuple(c) for c in chains.values()}) == 1
    # The EMPI's OPRF key was reshared to B's new sealing key, the key itself unchanged.
    async def reshared():
        view = (await cluster.call("B", "status"))["oprf"]
        return view if view["current"] == 1 and view["held"] == 1 else None
    view = await wait_for(reshared, timeout=60)
    assert view["mode"] == "reshare" and view["participants"] == ["A", "B", "C"]
