"""Pulls on a real 4-node consortium: verified copies, refusals on chain, hostile requests, erasure,
a tampered vault, leak tracing, the audit trail and the event feed."""

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import trio

from ehrnode import codec, crypto, synthetic
from ehrnode.client import ApiClient, ApiError
from ehrnode.localnet import LocalConsortium
from ehrnode.net.protocol import AnswerFrame, PullFrame, decode_frame, encode_frame, unbatch
from ehrnode.records.fhir import Item
from ehrnode.records.keys import RecordKeys, open_sealed, seal
from ehrnode.records.submit import add_items
from ehrnode.sharing.messages import PullAnswer, PullRequest
from tests.commands import cli
from tests.daemon.test_bad_peers import handshake_as, open_peer
from tests.waiting import eventually


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Plaintext peer links: the hostile requests below are sent over a raw peer link as member B.
    c = LocalConsortium(tmp_path_factory.mktemp("sharing") / "consortium", tls=False)
    c.start_all()
    trio.run(c.wait_ready)
    yield c
    c.stop_all()


@pytest.fixture(scope="module")
def recorded(cluster):
    """Six synthetic patients recorded at C (the owner); rows by record id, raw resources by source."""
    people = synthetic.people(6, seed=3)
    resources = [r for p in people for r in synthetic.patient_resources(p, "C", visits=2, seed=3)]
    items = [Item(f"input:{i}", r) for i, r in enumerate(resources)]

    async def go():
        async with ApiClient.connect(cluster.configs["C"]) as client:
            return await add_items(client, items, timeout=60)

    out = trio.run(go)
    assert all(out.heights.get(r["tx_id"]) for r in out.records)
    raw = {item.source: item.resource for item in items}
    return [dict(r, raw=raw[r["source"]]) for r in out.records if r["resource_type"] != "Patient"], \
        {r["source"]: r for r in out.records if r["resource_type"] == "Patient"}, raw


def _records_of(recorded, n):
    rows, patients, _ = recorded
    # One clinical record per patient, distinct patients.
    seen, picked = set(), []
    for row in rows:
        if row["patient"] not in seen:
            seen.add(row["patient"])
            picked.append(row)
    return picked[n]


def call(cluster, name, method, **params):
    return trio.run(lambda: cluster.call(name, method, **params))


def _identifiers(raw_patient):
    values = {raw_patient["id"], raw_patient.get("birthDate")}
    for name in raw_patient.get("name", []):
        values.update(name.get("given", []))
        values.add(name.get("family"))
    for ident in raw_patient.get("identifier", []):
        values.add(ident["value"])
    for address in raw_patient.get("address", []):
        values.update(address.get("line", []))
        values.add(address.get("postalCode"))
    for telecom in raw_patient.get("telecom", []):
        values.add(telecom["value"])
    return {v for v in values if v and len(v) >= 4}


def test_pull_across_institutions_is_verified_logged_and_deidentified(cluster, recorded, tmp_path):
    rows, patients, raw = recorded
    patient_rows = list(patients.values())
    needles = set()
    for row in patient_rows:
        needles |= _identifiers(raw[row["source"]])
    assert len(needles) > 20
    out = tmp_path / "copy.json"
    for row in rows[:12]:
        result = cli("records", "pull", row["record_id"], "--purpose", "treatment", "--config",
                     cluster.configs["B"].path, "--out", out, "--json")
        assert result.returncode == 0, result.stderr
        pulled = json.loads(result.stdout)
        assert pulled["verified"] and pulled["owner"] == "C" and not pulled["emergency"]
        text = json.dumps(pulled["resource"], ensure_ascii=False)
        assert not [n for n in needles if n in text], f"identifier in the served copy of {row['resource_type']}"
        assert pulled["resource"]["resourceType"] == row["resource_type"]
        assert oct(out.stat().st_mode & 0o777) == "0o600"
        out.unlink()
    # The access was committed before the answer came back; every member's chain has it.
    trio.run(cluster.wait_caught_up, ["R"])
    trail = call(cluster, "R", "audit.trail", record_id=rows[0]["record_id"])
    accesses = [e for e in trail if e["event"] == "access"]
    assert [(a["who"], a["owner"], a["decision"], a["purpose"]) for a in accesses] == [("B", "C", "granted",
                                                                                         "treatment")]
    # The pull answered with the access log it was served under, committed at that height.
    first = json.loads(cli("records", "pull", rows[0]["record_id"], "--purpose", "operations", "--config",
                           cluster.configs["B"].path, "--json").stdout)
    trio.run(lambda: cluster.wait_height(["R"], first["height"]))
    logged = [e for e in call(cluster, "R", "audit.trail", record_id=rows[0]["record_id"])
              if e["event"] == "access" and e["tx_id"] == first["access_tx"]]
    assert [(e["purpose"], e["height"]) for e in logged] == [("operations", first["height"])]
    trio.run(cluster.wait_caught_up, ["A", "B", "C", "R"])
    trail = call(cluster, "R", "audit.trail", record_id=rows[0]["record_id"])
    for name in ("A", "B", "C"):
        assert call(cluster, name, "audit.trail", record_id=rows[0]["record_id"]) == trail


def test_concurrent_pulls_are_each_logged_once_under_the_access_log_they_were_served_by(cluster, recorded):
    rows, _, _ = recorded
    wanted = [(name, row["record_id"]) for name, row in zip(("A", "B") * 5, rows[2:12], strict=True)]
    pulled = {}

    async def pull(name, record_id):
        async with ApiClient.connect(cluster.configs[name]) as client:
            pulled[(name, record_id)] = await client.call("records.pull", record_id=record_id, purpose="treatment",
                                                          timeout=60)

    async def all_at_once():
        async with trio.open_nursery() as nursery:
            for name, record_id in wanted:
                nursery.start_soon(pull, name, record_id)

    trio.run(all_at_once)
    assert all(p["verified"] for p in pulled.values()) and len(pulled) == len(wanted)
    trio.run(lambda: cluster.wait_height(["R"], max(p["height"] for p in pulled.values())))
    for (name, record_id), p in pulled.items():
        # Decisions made together may share a transaction; each is on chain once, under the one it was served by.
        logged = [e for e in call(cluster, "R", "audit.trail", record_id=record_id)
                  if e["event"] == "access" and e["who"] == name and e["tx_id"] == p["access_tx"]]
        assert len(logged) == 1 and logged[0]["height"] == p["height"]


def test_revoked_consent_is_refused_on_chain_and_emergency_overrides_missing_consent(cluster, recorded):
    row = _records_of(recorded, 1)
    empi = row["empi"]
    call(cluster, "C", "consent.revoke", empi=empi, to="A", purposes=["treatment"], scope=["*"], until=0)
    with pytest.raises(ApiError) as refused:
        call(cluster, "A", "records.pull", record_id=row["record_id"], purpose="treatment")
    assert refused.value.reason == "consent" and "access log" in str(refused.value)
    # Emergency: no consent entry covers it, and the packaged policy overrides a missing consent.
    pulled = call(cluster, "A", "records.pull", record_id=row["record_id"], purpose="emergency")
    assert pulled["emergency"] is True and pulled["verified"]
    # Research needs a grant (not in the default): refused, then allowed once granted.
    research_row = next(r for r in recorded[0] if r["empi"] == empi and r["resource_type"] in ("Observation",
                                                                                                  "Condition"))
    with pytest.raises(ApiError) as no_grant:
        call(cluster, "A", "records.pull", record_id=research_row["record_id"], purpose="research")
    assert no_grant.value.reason == "consent"
    call(cluster, "C", "consent.grant", empi=empi, to="A", purposes=["research"], scope=["*"], until=0)
    assert call(cluster, "A", "records.pull", record_id=research_row["record_id"], purpose="research")["verified"]

    trio.run(cluster.wait_caught_up, ["R"])
    trail = call(cluster, "R", "audit.trail", empi=empi)
    decisions = [(e["who"], e["purpose"], e["decision"], e["reason"]) for e in trail if e["event"] == "access"]
    assert ("A", "treatment", "refused", "consent") in decisions
    assert ("A", "emergency", "granted", "emergency_override") in decisions
    assert ("A", "research", "granted", "granted") in decisions
    assert [e["action"] for e in trail if e["event"] == "consent"] == ["revoke", "grant"]
    disclosures = call(cluster, "R", "audit.disclosures", empi=empi)
    assert {(d["who"], d["purpose"]) for d in disclosures} >= {("A", "emergency"), ("A", "research")}
    assert all(d["decision"] == "granted" for d in disclosures)
    result = cli("audit", "disclosures", "--empi", empi, "--config", cluster.configs["R"].path)
    assert result.returncode == 0 and "EMERGENCY" in result.stdout


def test_regulator_reads_logs_not_records(cluster, recorded):
    row = _records_of(recorded, 2)
    with pytest.raises(ApiError) as refused:
        call(cluster, "R", "records.pull", record_id=row["record_id"], purpose="public-health")
    assert refused.value.reason == "policy"
    # A node does not pull its own records, and a record nobody anchored is not asked for.
    with pytest.raises(ApiError) as own:
        call(cluster, "C", "records.pull", record_id=row["record_id"], purpose="treatment")
    assert own.value.reason == "own_record"
    with pytest.raises(ApiError) as unknown:
        call(cluster, "A", "records.pull", record_id="00" * 16, purpose="treatment")
    assert unknown.value.reason == "not_found"


async def _ask(ws, data):
    await ws.send_message(encode_frame(PullFrame(data)))
    with trio.fail_after(30):
        while True:
            for frame in unbatch(decode_frame(await ws.get_message())):
                if isinstance(frame, AnswerFrame):
                    return PullAnswer.decode(frame.data)


def test_hostile_requests_are_each_refused_and_logged(cluster, recorded):
    """Requests sent straight over a peer link, as member B (its node stopped meanwhile)."""
    row = _records_of(recorded, 3)
    record = bytes.fromhex(row["record_id"])
    b_identity = crypto.Identity.load(cluster.configs["B"].signing_key_path)
    b_sealing = crypto.SealingKey.load(cluster.configs["B"].sealing_key_path)
    chain = cluster.genesis.chain_id
    now = lambda: int(time.time() * 1000)  # noqa: E731

    def request(**changes):
        fields = dict(chain_id=chain, requester="B", user=b"u" * 15, role="clinician", owner="C", record=record,
                      purpose="treatment", time_ms=now(), identity=b_identity)
        fields.update(changes)
        return PullRequest.create(**fields).encode()

    async def go():
        cluster.stop("B")
        try:
            async with await open_peer(cluster, "C") as ws:
                await handshake_as(cluster, ws, "B", b_identity)
                answers = {}
                good = request()
                answers["good"] = await _ask(ws, good)
                answers["replayed"] = await _ask(ws, good)
                answers["stale"] = await _ask(ws, request(time_ms=now() - 10 * 60_000))
                answers["future"] = await _ask(ws, request(time_ms=now() + 10 * 60_000))
                answers["forged"] = await _ask(ws, request(identity=crypto.Identity.generate()))
                answers["other_member"] = await _ask(ws, request(requester="A"))
                # A non-member cannot connect at all (the handshake refuses it, see tests/daemon); over
                # a member's link, a request in its name is refused like any other impostor's.
                answers["non_member"] = await _ask(ws, request(requester="Mallory",
                                                                identity=crypto.Identity.generate()))
                answers["malformed"] = await _ask(ws, b"\xa1\x61x\x01")
                answers["wrong_owner"] = await _ask(ws, request(owner="A"))
                answers["no_such_record"] = await _ask(ws, request(record=os.urandom(16)))
                return answers
        finally:
            cluster.start("B")

    answers = trio.run(go)
    good = answers["good"]
    assert good.status == "served" and len(good.access) == 32
    assert json.loads(codec.decode(b_sealing.open(good.data, good.request))["resource"])
    expected = {"replayed": "replayed", "stale": "stale", "future": "stale", "forged": "bad_signature",
                "other_member": "unknown_requester", "non_member": "unknown_requester", "malformed": "malformed",
                "wrong_owner": "wrong_owner"}
    for case, reason in expected.items():
        assert (answers[case].status, answers[case].reason) == ("rejected", reason), case
        assert answers[case].access == b"", case  # nobody provably asked: nothing on chain
    rejected = [json.loads(line) for line in cluster.log("C").splitlines() if '"pull.rejected"' in line]
    logged = {entry["reason"] for entry in rejected if entry.get("event") == "pull.rejected"}
    assert set(expected.values()) <= logged, logged
    # A signed request for a record that does not exist is decided: refused, on chain.
    missing = answers["no_such_record"]
    assert (missing.status, missing.reason) == ("refused", "not_found") and len(missing.access) == 32
    trio.run(cluster.wait_caught_up, ["A"])  # C committed the refusal before it answered
    status = call(cluster, "A", "tx.get", tx_id=missing.access.hex())
    assert status["height"] is not None
    trio.run(lambda: cluster.wait_ready())


def test_erased_record_answers_erased_and_the_vault_still_verifies(cluster, recorded):
    row = _records_of(recorded, 4)
    result = cli("records", "erase", row["record_id"], "--reason", "patient withdrew (ticket 4411)", "--config",
                 cluster.configs["C"].path, "--json")
    assert result.returncode == 0, result.stderr
    erased = json.loads(result.stdout)
    assert erased["status"] == "ok" and erased["height"]
    with pytest.raises(ApiError) as refused:
        call(cluster, "B", "records.pull", record_id=row["record_id"], purpose="treatment")
    assert refused.value.reason == "erased"
    with pytest.raises(ApiError) as again:
        call(cluster, "C", "records.erase", record_id=row["record_id"], reason="twice")
    assert again.value.reason == "already_erased"
    with pytest.raises(ApiError) as not_owner:
        call(cluster, "A", "records.erase", record_id=row["record_id"], reason="not mine")
    assert not_owner.value.reason == "not_found"
    report = call(cluster, "C", "vault.verify")
    assert report["ok"] and report["erased"] >= 1, report["problems"]
    trio.run(cluster.wait_caught_up, ["R"])
    trail = call(cluster, "R", "audit.trail", record_id=row["record_id"])
    assert [e["event"] for e in trail][-2:] == ["erased", "access"]
    # The reason's text stays at the owner; the chain holds its digest.
    assert trail[-2]["reason_digest"] == crypto.sha256(b"patient withdrew (ticket 4411)").hex()
    for name in cluster.names:
        for path in cluster.configs[name].data_dir.glob("*.sqlite3*"):
            if name != "C" or "vault" not in path.name:
                assert b"ticket 4411" not in path.read_bytes(), path


def _tamper_release(config, record_id):
    """What an insider with the owner's keys and database could do: re-encrypt a changed release."""
    import sqlite3

    keys = RecordKeys.load(config.master_key_path, config.consortium_key_path)
    db = sqlite3.connect(config.data_dir / "vault.sqlite3", isolation_level=None)
    try:
        deid_ct, wrapped = db.execute("SELECT e.deid, k.deid FROM entries e JOIN data_keys k USING (record) "
                                      "WHERE e.record = ?", (record_id,)).fetchone()
        key = open_sealed(keys.wrap, wrapped, record_id + b"deid-key", "key")
        release = codec.decode(open_sealed(key, deid_ct, record_id + b"deid", "release"))
        resource = json.loads(release["resource"])
        resource["status"] = "entered-in-error" if resource.get("status") != "entered-in-error" else "final"
        release["resource"] = json.dumps(resource, sort_keys=True, separators=(",", ":")).encode()
        db.execute("DROP TRIGGER IF EXISTS entries_no_update")
        db.execute("UPDATE entries SET deid = ? WHERE record = ?",
                   (seal(key, codec.encode(release), record_id + b"deid"), record_id))
    finally:
        db.close()


def test_tampered_vault_raises_integrity_error_and_alarm_on_chain(cluster, recorded):
    row = _records_of(recorded, 5)
    _tamper_release(cluster.configs["C"], bytes.fromhex(row["record_id"]))
    with pytest.raises(ApiError) as broken:
        call(cluster, "B", "records.pull", record_id=row["record_id"], purpose="treatment")
    assert broken.value.reason == "commitment_mismatch" and "alert" in str(broken.value)
    assert '"event": "integrity.mismatch"' in cluster.log("B")
    trio.run(cluster.wait_caught_up, ["R"])
    trail = call(cluster, "R", "audit.trail", record_id=row["record_id"])
    alarms = [e for e in trail if e["event"] == "integrity_alarm"]
    assert [(a["who"], a["owner"]) for a in alarms] == [("B", "C")]
    # The owner's own check finds it too.
    report = call(cluster, "C", "vault.verify")
    assert not report["ok"] and {p["record_id"] for p in report["problems"]} == {row["record_id"]}


def test_trace_leak_finds_every_recipient(cluster, recorded, tmp_path):
    row = _records_of(recorded, 0)
    copies = {}
    for name in ("A", "B"):
        out = tmp_path / f"{name}.json"
        result = cli("records", "pull", row["record_id"], "--purpose", "treatment", "--config",
                     cluster.configs[name].path, "--out", out)
        assert result.returncode == 0, result.stderr
        copies[name] = out
    # The leaked file, reformatted (whitespace and key order do not matter).
    leaked = json.loads(copies["A"].read_text())
    (tmp_path / "leak.json").write_text(json.dumps({"resource": leaked["resource"], "salt": leaked["salt"]},
                                                   indent=4, sort_keys=False))
    result = cli("audit", "trace-leak", tmp_path / "leak.json", "--config", cluster.configs["R"].path, "--json")
    assert result.returncode == 0, result.stderr
    traced = json.loads(result.stdout)
    assert traced["record_id"] == row["record_id"] and traced["owner"] == "C"
    assert {"A", "B"} <= set(traced["recipients"])
    # An altered copy is not any record's.
    leaked["resource"]["id"] = "changed"
    (tmp_path / "altered.json").write_text(json.dumps(leaked))
    result = cli("audit", "trace-leak", tmp_path / "altered.json", "--config", cluster.configs["R"].path)
    assert result.returncode == 2 and "altered" in result.stderr


def test_audit_trail_as_fhir_audit_events(cluster, recorded):
    from fhir.resources.R4B.bundle import Bundle

    empi = _records_of(recorded, 1)["empi"]
    result = cli("audit", "trail", "--empi", empi, "--fhir", "--config", cluster.configs["R"].path)
    assert result.returncode == 0, result.stderr
    bundle = json.loads(result.stdout)
    Bundle.model_validate(bundle)  # valid FHIR
    events = [e["resource"] for e in bundle["entry"]]
    assert {e["action"] for e in events} >= {"C", "R", "U"}
    refused = [e for e in events if e["outcome"] == "4"]
    assert refused and all(e["purposeOfEvent"][0]["coding"][0]["code"] for e in refused)
    text = cli("audit", "trail", "--empi", empi, "--config", cluster.configs["R"].path)
    assert text.returncode == 0 and "refused" in text.stdout and "EMERGENCY" in text.stdout


def _metric(cluster, name, metric):
    address = cluster.configs[name].metrics_listen
    with urllib.request.urlopen(f"http://{address.host}:{address.port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return float(re.search(rf"^{metric} (\S+)$", text, re.M).group(1))


def _follow(proc):
    """The events a running ``ehrnode watch`` prints, read as they come (a list that grows)."""
    seen: list = []

    def read():
        for line in proc.stdout:
            seen.append(json.loads(line))

    threading.Thread(target=read, daemon=True).start()
    return seen


def test_watch_receives_every_kind_of_event(cluster, recorded):
    rows, patients, _ = recorded
    row = next(r for r in rows if r["empi"] == _records_of(recorded, 2)["empi"] and r != _records_of(recorded, 2))
    empi = row["empi"]
    kinds = {"record.new", "consent.changed", "record.accessed", "record.erased", "integrity.alarm"}
    watch = subprocess.Popen([sys.executable, "-m", "ehrnode.cli", "watch", "--empi", empi, "--config",
                              str(cluster.configs["R"].path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    own = subprocess.Popen([sys.executable, "-m", "ehrnode.cli", "watch", "--config",
                            str(cluster.configs["C"].path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    seen, own_seen = _follow(watch), _follow(own)
    try:
        # A watch sees only what commits after it subscribed.
        eventually(lambda: _metric(cluster, "R", "ehrnode_event_subscriptions") >= 1
                  and _metric(cluster, "C", "ehrnode_event_subscriptions") >= 1)
        index = [r["empi"] for r in patients.values()].index(empi)
        person = synthetic.people(6, seed=3)[index]
        more = synthetic.patient_resources(person, "A", visits=1, seed=11)

        async def record_at_a():
            async with ApiClient.connect(cluster.configs["A"]) as client:
                return await add_items(client, [Item(f"a:{i}", r) for i, r in enumerate(more)], timeout=60)

        # The same person, registered at A: new records for that EMPI elsewhere, anchored together.
        at_a = trio.run(record_at_a)
        assert len({r["tx_id"] for r in at_a.records}) == 1
        call(cluster, "C", "consent.grant", empi=empi, to="B", purposes=["treatment"], scope=["*"], until=0)
        call(cluster, "B", "records.pull", record_id=row["record_id"], purpose="treatment")
        call(cluster, "C", "records.erase", record_id=row["record_id"], reason="duplicate entry")
        _tamper_release(cluster.configs["C"], bytes.fromhex(next(
            r for r in rows if r["empi"] == empi and r["record_id"] != row["record_id"])["record_id"]))
        with pytest.raises(ApiError):
            call(cluster, "A", "records.pull", record_id=next(
                r for r in rows if r["empi"] == empi and r["record_id"] != row["record_id"])["record_id"],
                purpose="treatment")
        # The alarm commits last; each watch prints it once its node has applied it. C's own feed:
        # A recorded one of C's patients; accesses, erasures and alarms of C's records.
        eventually(lambda: {e["event"] for e in seen} >= kinds and {e["event"] for e in own_seen} >= kinds)
    finally:
        for proc in (watch, own):
            proc.terminate()
        for proc in (watch, own):
            proc.wait(timeout=10)
    # One event per record, though one transaction anchored them all.
    assert sorted(e["record_id"] for e in seen if e["event"] == "record.new" and e["institution"] == "A") == sorted(
        r["record_id"] for r in at_a.records)
    assert all(e["empi"] == empi for e in seen)
