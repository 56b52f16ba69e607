"""The OPRF key on a real consortium: the institutions generate it together at genesis, each ends
up holding a share that matches its public share on the chain, and when a member leaves the
remaining ones reshare it, keeping the key. Enrolments at two institutions link through it, and
a member asking for more evaluations than the others answer it in a day is refused, with every
batch on the chain."""

import pytest
import trio

from ehrnode import synthetic
from ehrnode.client import ApiClient, ApiError
from ehrnode.ledger.state import LedgerState
from ehrnode.membership import Membership
from ehrnode.records.fhir import Item
from ehrnode.records.submit import add_items

from .test_membership import wait_for

INSTITUTIONS = ("A", "B", "C")


async def _held(cluster, names, round_):
    views = {}
    for name in names:
        view = (await cluster.call(name, "status"))["oprf"]
        if view is None or view["current"] != round_ or view.get("held") != round_:
            return None
        views[name] = view
    return views


async def test_institutions_generate_the_key_together_and_reshare_it_when_one_leaves(cluster):
    cluster.start_all()
    await cluster.wait_ready()
    views = await wait_for(lambda: _held(cluster, INSTITUTIONS, 0), timeout=90)
    keys = {v["public_key"] for v in views.values()}
    assert len(keys) == 1 and None not in keys
    first = views["A"]
    assert first["mode"] == "fresh" and first["status"] == "complete" and first["threshold"] == 2
    assert first["participants"] == list(INSTITUTIONS) and first["waiting_for"] == []
    # The regulator follows the rounds (once it has applied the last one's block) and holds nothing.
    with trio.fail_after(30):
        while (regulator := (await cluster.call("R", "status"))["oprf"])["current"] != 0:
            await trio.sleep(0.2)
    assert regulator["current"] == 0 and "held" not in regulator and regulator["public_key"] == first["public_key"]

    proposed = await cluster.call("A", "consortium.propose", change="remove", name="C", reason="left the network")
    await cluster.call("B", "consortium.vote", proposal=proposed["proposal"]["id"])
    await cluster.call("R", "consortium.vote", proposal=proposed["proposal"]["id"])
    views = await wait_for(lambda: _held(cluster, ("A", "B"), 1), timeout=90)
    for view in views.values():
        assert view["mode"] == "reshare" and view["participants"] == ["A", "B"] and view["threshold"] == 2
        assert view["public_key"] == first["public_key"]  # the same key, shared anew
    with trio.fail_after(30):
        while (await cluster.call("R", "status"))["oprf"]["current"] != 1:
            await trio.sleep(0.2)


def _set_quota(cluster, name, quota):
    path = cluster.configs[name].path
    text = path.read_text()
    path.write_text(text + f"\n[empi]\noprf_daily = {quota}\n")


async def _add(cluster, member, people):
    resources = [r for p in people for r in synthetic.patient_resources(p, member, visits=0)]
    async with ApiClient.connect(cluster.configs[member]) as client:
        out = await add_items(client, [Item(f"in:{i}", r) for i, r in enumerate(resources)], timeout=60)
    return [r["empi"] for r in out.records if r["resource_type"] == "Patient"]


async def test_enrolments_link_through_the_oprf_and_guessing_past_the_quota_is_refused(cluster):
    # B and C answer A (and each other) for at most QUOTA evaluations a day.
    for name in ("B", "C"):
        _set_quota(cluster, name, QUOTA)
    cluster.start_all()
    await cluster.wait_ready()
    await wait_for(lambda: _held(cluster, INSTITUTIONS, 0), timeout=90)
    people = synthetic.people(8, seed=11)
    # The same person, with the same SSN, enrolled at A and at B: the same EMPI. Neither could
    # compute the other's national-id pseudonym alone; both asked the others.
    assert await _add(cluster, "A", people[:1]) == await _add(cluster, "B", people[:1])
    # A goes on, asking for more than the others answer it in a day: refused, nothing recorded.
    with pytest.raises(ApiError) as refused:
        await _add(cluster, "A", people[1:])
    assert "over_quota" in str(refused.value)
    for name in ("B", "C"):
        assert '"event": "oprf.refused"' in cluster.log(name) and "over_quota" in cluster.log(name)
    # Every batch is on the chain, with its size, for the audit: the regulator reads them.
    cluster.stop_all()
    state = LedgerState(cluster.configs["R"].data_dir / "state.sqlite3", cluster.genesis.chain_id,
                        Membership(0, 0, cluster.genesis.members))
    try:
        totals = {t["requester"]: t for t in state.oprf_usage.totals()}
    finally:
        state.close()
    assert set(totals) == {"A", "B"}
    assert totals["A"]["batches"] == 2 and totals["A"]["evaluations"] > QUOTA


QUOTA = 150
