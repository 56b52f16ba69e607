"""A member turned hostile, with its own real keys, against a real four-member consortium.

Each attack of a member (or a process on a member's host) is refused with its reason, counted
in ``ehrnode_limited_total`` or on chain, and the honest members keep committing and serving.
The peer links here are plaintext (the attacks are the same over TLS, which tests/daemon/test_tls.py
covers): the hostile member is a test helper that speaks the real protocol with B's real keys.
"""

import json
import os
import re
import socket
import time
import urllib.request

import pytest
import trio

from ehrnode import crypto, synthetic
from ehrnode.client import ApiClient, ApiError
from ehrnode.ledger.empi_registry import scoped_enrolment
from ehrnode.ledger.transactions import DAY_MS
from ehrnode.localnet import LocalConsortium
from ehrnode.net.peers import MAX_PENDING_HANDSHAKES, MAX_UNAUTHENTICATED_PER_SOURCE
from ehrnode.net.protocol import AnswerFrame, PullFrame, decode_frame, encode_frame, unbatch
from ehrnode.records.fhir import Item
from ehrnode.records.submit import add_items
from ehrnode.sharing.messages import PullAnswer, PullRequest
from ehrnode.sharing.owner import MAX_IN_FLIGHT_PER_MEMBER, REFUSAL_LOGS_BURST, REFUSAL_LOGS_PER_MINUTE
from tests.commands import cli
from tests.waiting import eventually

from .test_bad_peers import handshake_as, open_peer


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalConsortium(tmp_path_factory.mktemp("hostile") / "consortium", tls=False)
    c.start_all()
    trio.run(c.wait_ready)
    yield c
    c.stop_all()


def record_at(cluster, name, people, seed):
    """Synthetic patients recorded at ``name``; the committed rows."""
    resources = [r for p in people for r in synthetic.patient_resources(p, name, visits=1, seed=seed)]

    async def go():
        async with ApiClient.connect(cluster.configs[name]) as client:
            return await add_items(client, [Item(f"in:{i}", r) for i, r in enumerate(resources)], timeout=60)

    out = trio.run(go)
    assert all(out.heights.get(r["tx_id"]) for r in out.records)
    return out.records


def limited(cluster, name):
    """``ehrnode_limited_total`` of a node, by limit."""
    address = cluster.configs[name].metrics_listen
    with urllib.request.urlopen(f"http://{address.host}:{address.port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {m[0]: float(m[1]) for m in re.findall(r'^ehrnode_limited_total\{limit="([a-z_]+)"\} (\S+)$', text, re.M)}


def limit_logs(cluster, name, limit):
    return [json.loads(line) for line in cluster.log(name).splitlines()
            if '"limit.refused"' in line and f'"limit": "{limit}"' in line]


def test_the_consent_override_through_the_cli_is_refused(cluster, tmp_path):
    """A records P and revokes for everyone; B records a dummy, links it to P's EMPI, grants itself
    consent, and pulls: the link waits for A, the grant is refused, the pull is refused."""
    a, b = cluster.configs["A"].path, cluster.configs["B"].path
    real = record_at(cluster, "A", synthetic.people(1, seed=41), seed=41)
    empi = next(r["empi"] for r in real if r["resource_type"] == "Patient")
    record = next(r["record_id"] for r in real if r["resource_type"] != "Patient")
    assert cli("consent", "revoke", "--config", a, "--empi", empi, "--to", "*").returncode == 0
    refused = cli("records", "pull", record, "--purpose", "treatment", "--config", b, "--json")
    assert refused.returncode != 0 and "consent" in refused.stderr

    dummy = record_at(cluster, "B", synthetic.people(1, seed=42), seed=42)
    mine = next(r["patient"] for r in dummy if r["resource_type"] == "Patient")
    enrolment = scoped_enrolment("B", bytes.fromhex(mine)).hex()
    linked = cli("empi", "link", enrolment, empi, "--config", b, "--json")
    assert linked.returncode == 0, linked.stderr
    assert json.loads(linked.stdout)["waiting"] == ["A"]  # held: A has not agreed
    granted = cli("consent", "grant", "--config", b, "--empi", empi, "--to", "B", "--json")
    assert granted.returncode == 2 and "not_holder" in granted.stderr
    again = cli("records", "pull", record, "--purpose", "treatment", "--config", b, "--json")
    assert again.returncode != 0 and "consent" in again.stderr
    # A merge of B's dummy into P is held the same way; A sees both requests waiting for it.
    dummy_empi = next(r["empi"] for r in dummy if r["resource_type"] == "Patient")
    merged = cli("empi", "merge", dummy_empi, empi, "--config", b, "--json")
    assert merged.returncode == 0 and json.loads(merged.stdout)["waiting"] == ["A"]
    waiting = json.loads(cli("empi", "requests", "--config", a, "--json").stdout)
    assert {(r["kind"], r["requester"]) for r in waiting} == {("link", "B"), ("merge", "B")}
    listed = json.loads(cli("records", "list", "--config", a, "--json", "--empi", empi).stdout)
    assert {r["institution"] for r in listed} == {"A"}
    # What went on chain carries the day it was recorded, nothing finer.
    assert all(r["recorded_at"] % DAY_MS == 0 for r in listed)


def test_idle_sockets_hold_no_handshake_slot_and_one_address_is_capped(cluster):
    """Forty silent connections from one address to R: eight are let wait, the rest refused and
    counted; C restarts and connects to R meanwhile; the silent ones are closed after 5 s."""
    address = cluster.configs["R"].peer_listen
    before = limited(cluster, "R")
    sockets = []
    try:
        for _ in range(MAX_PENDING_HANDSHAKES + MAX_UNAUTHENTICATED_PER_SOURCE):
            s = socket.socket()
            s.bind(("127.0.0.66", 0))
            s.connect((address.host, address.port))
            sockets.append(s)
        cluster.stop("C")
        cluster.start("C")
        trio.run(cluster.wait_ready)
    finally:
        time.sleep(6)  # past the first-bytes timeout
        for s in sockets:
            s.close()
    after = limited(cluster, "R")
    assert after.get("peer_source", 0) - before.get("peer_source", 0) >= MAX_PENDING_HANDSHAKES
    assert after.get("peer_idle", 0) - before.get("peer_idle", 0) >= MAX_UNAUTHENTICATED_PER_SOURCE
    logged = limit_logs(cluster, "R", "peer_source")
    assert logged and logged[-1]["who"] == "127.0.0.66"
    assert trio.run(cluster.height, "R") > 0


def test_one_member_cannot_take_every_pull_slot_or_log_refusals_without_bound(cluster):
    """B (its node stopped, its keys used by the test) floods C with signed pulls."""
    rows = record_at(cluster, "C", synthetic.people(2, seed=43), seed=43)
    record = next(r["record_id"] for r in rows if r["resource_type"] != "Patient")
    b_identity = crypto.Identity.load(cluster.configs["B"].signing_key_path)
    chain = cluster.genesis.chain_id

    def request(record_id):
        return PullRequest.create(chain_id=chain, requester="B", user=b"u" * 15, role="clinician", owner="C",
                                  record=record_id, purpose="treatment", time_ms=int(time.time() * 1000),
                                  identity=b_identity).encode()

    async def wave(ws, count, sent=lambda: None):
        """``count`` requests for records that do not exist, sent at once; their answers."""
        for _ in range(count):
            await ws.send_message(encode_frame(PullFrame(request(os.urandom(16)))))
        sent()
        answers = []
        with trio.fail_after(120):
            while len(answers) < count:
                for frame in unbatch(decode_frame(await ws.get_message())):  # answers queued together
                    if isinstance(frame, AnswerFrame):
                        answers.append(PullAnswer.decode(frame.data))
        return answers

    async def go():
        cluster.stop("B")
        # With R stopped too nothing commits: every pull that takes a slot holds it until its
        # refusal's log commits, once R is back, whatever the speed of this machine.
        cluster.stop("R")
        try:
            async with await open_peer(cluster, "C") as ws:
                await handshake_as(cluster, ws, "B", b_identity)
                started = time.monotonic()
                burst = await wave(ws, MAX_IN_FLIGHT_PER_MEMBER + 100, sent=lambda: cluster.start("R"))
                # While B floods, A is served a record of C's.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(wave, ws, 100)
                    pulled = await cluster.call("A", "records.pull", record_id=record, purpose="treatment")
                rest = []
                for _ in range(3):
                    rest += await wave(ws, 100)
                return burst, rest, pulled, time.monotonic() - started
        finally:
            if cluster.procs["R"].poll() is not None:
                cluster.start("R")
            cluster.start("B")

    burst, rest, pulled, seconds = trio.run(go)
    assert pulled["verified"] and pulled["owner"] == "C"
    assert [(a.status, a.reason) for a in burst].count(("rejected", "busy")) == 100  # one member's share: 128
    logged = [a for a in burst + rest if a.status == "refused"]
    assert all(a.reason == "not_found" and len(a.access) == 32 for a in logged)
    # On chain: at most the burst, plus what the quota refilled while this ran (and the 100 sent
    # during A's pull, which may or may not have found slots).
    assert len(logged) <= REFUSAL_LOGS_BURST + REFUSAL_LOGS_PER_MINUTE * (seconds + 5) / 60
    limited_answers = [a for a in rest if (a.status, a.reason) == ("rejected", "rate_limited")]
    assert limited_answers and all(a.access == b"" for a in limited_answers)
    counts = limited(cluster, "C")
    assert counts.get("pull_slots_member", 0) >= 1 and counts.get("refusal_logs", 0) >= len(limited_answers)
    assert limit_logs(cluster, "C", "refusal_logs")[0]["who"] == "B"
    trio.run(cluster.wait_ready)


def test_staging_is_bounded_by_parsed_size_and_unauthenticated_api_connections_by_count(cluster):
    config = cluster.configs["A"]
    # Items whose JSON is small but parses to 20 times its size: the node refuses to hold more
    # than its limit once parsed, drops what was staged, and says so.
    heavy = {"resourceType": "Basic", "id": "x", "extension": [[] for _ in range(300_000)]}

    async def stage():
        async with ApiClient.connect(config) as client:
            with pytest.raises(ApiError) as err:
                for i in range(100):
                    await client.call("records.stage", items=[{"source": f"heavy:{i}", "resource": heavy}])
            return err.value.reason, i, await client.call("status")

    reason, sent, status = trio.run(stage)
    assert reason == "too_large" and sent < 100 and status["node"] == "A"
    assert limited(cluster, "A").get("api_staged", 0) >= 1

    address = config.api_listen
    sockets = []
    try:
        for _ in range(80):
            sockets.append(socket.create_connection((address.host, address.port)))
        # The node counts each as its accept loop takes it.
        eventually(lambda: limited(cluster, "A").get("api_unauthenticated", 0) >= 80 - 64, timeout=30, step=0.1)
    finally:
        for s in sockets:
            s.close()
    # Once the silent ones are gone (closed, or timed out after 10 s), a client with a credential
    # gets in again.
    trio.run(cluster.wait_ready, ["A"], 20.0)
    assert trio.run(cluster.height, "A") > 0
