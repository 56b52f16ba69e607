"""The confidential chain on a real 4-node consortium: what a copied block store shows, epoch key
rotation on demand and under load, and rotation on schedule."""

import sqlite3

import pytest
import trio

from ehrnode import codec, synthetic
from ehrnode.client import ApiClient
from ehrnode.consensus.types import Block
from ehrnode.ledger.envelope import SIZE_BUCKETS, Envelope
from ehrnode.localnet import LocalConsortium
from ehrnode.records.fhir import Item
from ehrnode.records.submit import add_items
from tests.commands import cli


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalConsortium(tmp_path_factory.mktemp("confidential") / "consortium")
    c.start_all()
    trio.run(c.wait_ready)
    yield c
    c.stop_all()


def block_store_bytes(cluster, name):
    db = sqlite3.connect(cluster.configs[name].data_dir / "blocks.sqlite3")
    try:
        return b"".join(bytes(v) for table in ("blocks", "committed") for row in db.execute(f"SELECT * FROM {table}")
                        for v in row if isinstance(v, (bytes, memoryview)))
    finally:
        db.close()


def test_a_copied_block_store_shows_no_patient_record_or_link(cluster):
    people = synthetic.people(3, seed=21)
    items = [Item(f"input:{i}", r) for i, r in enumerate(
        r for p in people for r in synthetic.patient_resources(p, "A", visits=1, seed=21))]

    async def go():
        async with ApiClient.connect(cluster.configs["A"]) as client:
            out = await add_items(client, items, timeout=60)
        record = next(r for r in out.records if r["resource_type"] != "Patient")
        empi = (await cluster.call("A", "empi.of", patients=[record["patient"]]))[record["patient"]]
        await cluster.call("A", "consent.grant", empi=empi, to="B", purposes=["treatment"])
        pulled = await cluster.call("B", "records.pull", record_id=record["record_id"], purpose="treatment")
        await cluster.wait_height(["R"], pulled["height"] + 1)
        listing = await cluster.call("R", "records.list", empi=empi)
        return out, listing, pulled

    out, listing, pulled = trio.run(go)
    assert pulled["verified"]
    raw = block_store_bytes(cluster, "R")
    assert len(raw) > 10_000
    empi = listing[0]["empi"]
    assert len(listing) > 1
    secrets = {
        "an EMPI": [empi.encode()],
        "a record id": [bytes.fromhex(r["record_id"]) for r in out.records],
        "an enrolment (institution-to-patient link)": [bytes.fromhex(r["patient"]) for r in out.records],
        "a commitment": [bytes.fromhex(a["commitment"]) for a in listing],
        "a kind or purpose": [b"record.anchor", b"empi.enrol", b"access.log", b"treatment", b"consent.grant"],
    }
    for what, needles in secrets.items():
        for needle in needles:
            assert needle not in raw, f"the block store shows {what}"
    # Every member reads them, and indexes them: the regulator lists the patient's records.
    state = sqlite3.connect(cluster.configs["R"].data_dir / "state.sqlite3")
    assert state.execute("SELECT COUNT(*) FROM anchors").fetchone()[0] == len(out.records)
    assert trio.run(lambda: cluster.call("R", "records.list", empi=empi)) == listing
    # Through its own API a member sees what each envelope holds.
    block = trio.run(lambda: cluster.call("R", "block.get", height=pulled["height"]))
    access = next(tx for tx in block["txs"] if tx["id"] == pulled["access_tx"])
    assert access["kind"] == "access.logs" and access["epoch"] == 0 and access["submitter"] == "A"


def test_keys_rotate_under_load_loses_no_transaction(cluster):
    before = trio.run(lambda: cluster.call("A", "keys.status"))["current"]

    async def go():
        ids: list[str] = []

        async def load(member, prefix):
            async with ApiClient.connect(cluster.configs[member]) as client:
                for n in range(15):
                    reply = await client.call("tx.submit_batch", notes=[f"{prefix}{n}-{i}" for i in range(20)])
                    assert not reply["errors"]
                    ids.extend(reply["tx_ids"])
                    await trio.sleep(0.05)

        rotations = []

        async def rotate(member):
            for _ in range(2):
                await trio.sleep(0.3)
                async with ApiClient.connect(cluster.configs[member]) as client:
                    rotations.append(await client.call("keys.rotate"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(load, "A", "a")
            nursery.start_soon(load, "B", "b")
            nursery.start_soon(rotate, "C")
        async with ApiClient.connect(cluster.configs["R"]) as client:
            heights = (await client.call("txs.wait", tx_ids=ids, timeout=60))["heights"]
        return ids, heights, rotations

    ids, heights, rotations = trio.run(go)
    assert len(ids) == 600 and all(heights[i] for i in ids), "a transaction was lost across the rotation"
    assert [r["epoch"] for r in rotations] == [before + 1, before + 2]
    for member in ("A", "B", "C", "R"):
        status = trio.run(cluster.call, member, "status")
        view = trio.run(cluster.call, member, "keys.status")
        assert status["ledger"]["stalled_at"] is None and not view["unreadable"]
        assert [e["held"] for e in view["epochs"]][-3:] == [True] * 3
    # Later blocks are sealed under the newest epoch.
    async def sealed_epochs():
        after = await cluster.call("A", "tx.submit", note="after", wait=True)
        await cluster.wait_height(["B"], after["height"])
        async with ApiClient.connect(cluster.configs["B"]) as client:
            head = await client.call("block.get")
            while not head["txs"]:
                head = await client.call("block.get", height=head["height"] - 1)
        return head

    head = trio.run(sealed_epochs)
    assert {tx["epoch"] for tx in head["txs"]} == {before + 2}
    shown = cli("keys", "status", "--config", cluster.configs["B"].path)
    assert shown.returncode == 0, shown.stderr
    assert f"current epoch {before + 2}" in shown.stdout and "by C" in shown.stdout


def test_every_entry_in_the_store_is_an_envelope_of_a_bucket_size(cluster):
    db = sqlite3.connect(cluster.configs["B"].data_dir / "blocks.sqlite3")
    rows = db.execute("SELECT body FROM blocks").fetchall()
    envelopes = [Envelope.decode(tx) for (body,) in rows for tx in Block.from_wire(codec.decode(body)).payload]
    assert {e.kind_class for e in envelopes} >= {"record", "empi", "consent", "access", "chain", "consortium"}
    assert {len(e.ciphertext) - 16 for e in envelopes} <= set(SIZE_BUCKETS)


def test_rotation_on_schedule_goes_round_the_members(tmp_path):
    c = LocalConsortium(tmp_path / "consortium")
    for config in c.configs.values():
        text = config.path.read_text().replace("[keys]\n", "[keys]\nrotate_days = 0.00005\n", 1)  # ~4.3 s
        config.path.write_text(text)
    c.start_all()
    try:
        async def go():
            await c.wait_ready()
            with trio.fail_after(90):
                while True:
                    view = await c.call("A", "keys.status")
                    if view["current"] >= 3:
                        return view
                    await trio.sleep(0.5)

        view = trio.run(go)
        assert view["rotate_days"] == 0.00005
        openers = [e["opened_by"] for e in view["epochs"][1:4]]
        assert openers == ["A", "B", "C"], openers  # epoch 0 -> A's turn, 1 -> B's, 2 -> C's
    finally:
        c.stop_all()
