"""Users and roles on a real 4-node consortium: each role's reach, pseudonyms on chain, tracing a leak
to a user, a patient's own disclosures, revocation, rotation and brute force."""

import json
import os
import sqlite3

import pytest
import trio

from ehrnode import synthetic
from ehrnode.api.gate import scope_of
from ehrnode.api.methods import ALWAYS, CATALOGUE
from ehrnode.api.methods import NAMES as METHODS
from ehrnode.client import ApiClient, ApiError
from ehrnode.localnet import LocalConsortium
from ehrnode.records.fhir import Item
from ehrnode.records.submit import add_items
from ehrnode.users.auth import FAILURE_DELAY, FREE_FAILURES
from ehrnode.users.roles import load_roles
from ehrnode.users.store import pseudonym_bytes
from tests.commands import cli

NURSE_ROLES = """
[roles.admin]
allow = ["*"]
[roles.nurse]
allow = ["status", "records.list", "records.pull:treatment"]
[roles.helpdesk]
allow = ["status", "users.add", "users.rotate", "users.revoke", "users.list"]
"""



@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalConsortium(tmp_path_factory.mktemp("users") / "consortium")
    # A has its own roles file: a nurse may pull for treatment there; C's policy does not name nurses.
    roles = c.configs["A"].path.parent / "roles.toml"
    roles.write_text(NURSE_ROLES)
    with open(c.configs["A"].path, "a") as f:
        f.write('\n[users]\nroles = "roles.toml"\n')
    c.start_all()
    trio.run(c.wait_ready)
    yield c
    c.stop_all()


class Users:
    """Users added through the admin API; credentials kept for the test to connect with."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.credentials: dict[tuple[str, str], str] = {}
        self.views: dict[tuple[str, str], dict] = {}

    def add(self, node, name, role, /, **extra):
        view = trio.run(lambda: self.cluster.call(node, "users.add", name=name, role=role, **extra))
        self.credentials[node, name] = view.pop("credential")
        self.views[node, name] = view
        return view

    def pseudonym(self, node, name):
        return self.views[node, name]["pseudonym"]

    async def call(self, node, name, method, /, **params):
        async with ApiClient.connect(self.cluster.configs[node], user=name,
                                     credential=self.credentials[node, name]) as client:
            return await client.call(method, **params)

    def run(self, node, name, method, /, **params):
        return trio.run(lambda: self.call(node, name, method, **params))


@pytest.fixture(scope="module")
def users(cluster):
    u = Users(cluster)
    for node in ("B", "C"):
        u.add(node, "dr.ana", "clinician")
        u.add(node, "clerk.bo", "clerk")
        u.add(node, "res.cy", "researcher")
        u.add(node, "aud.di", "auditor")
    u.add("A", "nurse.ed", "nurse")
    return u


@pytest.fixture(scope="module")
def recorded(cluster, users):
    """Four synthetic patients recorded at C by its clerk."""
    people = synthetic.people(4, seed=11)
    items = [Item(f"input:{i}", r) for i, r in enumerate(
        r for p in people for r in synthetic.patient_resources(p, "C", visits=1, seed=11))]

    async def go():
        async with ApiClient.connect(cluster.configs["C"], user="clerk.bo",
                                     credential=users.credentials["C", "clerk.bo"]) as client:
            return await add_items(client, items, timeout=60)

    out = trio.run(go)
    assert all(out.heights.get(r["tx_id"]) for r in out.records)
    return [r for r in out.records if r["resource_type"] != "Patient"]


def forbidden(users, node, name, method, /, **params):
    with pytest.raises(ApiError) as refused:
        users.run(node, name, method, **params)
    assert refused.value.reason == "forbidden", refused.value
    return str(refused.value)


def test_each_role_does_what_it_may_and_is_refused_otherwise(cluster, users, recorded):
    record = recorded[0]
    # The clerk recorded (above); may not read a record's content, pull, audit or manage users.
    assert "may not call records.show" in forbidden(users, "C", "clerk.bo", "records.show",
                                                   record_id=record["record_id"])
    forbidden(users, "B", "clerk.bo", "records.pull", record_id=record["record_id"], purpose="treatment")
    forbidden(users, "C", "clerk.bo", "audit.trail", record_id=record["record_id"])
    forbidden(users, "C", "clerk.bo", "users.add", name="x", role="admin")
    # The clinician reads and pulls for care, not for research, and cannot resolve pseudonyms.
    assert users.run("C", "dr.ana", "records.show", record_id=record["record_id"])["resource"]
    pulled = users.run("B", "dr.ana", "records.pull", record_id=record["record_id"], purpose="treatment")
    assert pulled["verified"]
    assert "for research" in forbidden(users, "B", "dr.ana", "records.pull", record_id=record["record_id"],
                                       purpose="research")
    forbidden(users, "B", "dr.ana", "audit.whois", pseudonym=users.pseudonym("B", "dr.ana"))
    # ... reads who saw a record, but not what a colleague did.
    assert users.run("B", "dr.ana", "audit.trail", record_id=record["record_id"])
    assert "for user" in forbidden(users, "B", "dr.ana", "audit.trail", user=users.pseudonym("B", "res.cy"))
    # The researcher pulls for research only; the owner then applies consent (none: refused, on chain).
    forbidden(users, "B", "res.cy", "records.pull", record_id=record["record_id"], purpose="treatment")
    with pytest.raises(ApiError) as no_consent:
        users.run("B", "res.cy", "records.pull", record_id=recorded[1]["record_id"], purpose="research")
    assert no_consent.value.reason in ("consent", "policy")
    # The auditor reads the trail and resolves pseudonyms, never a record's content.
    assert users.run("B", "aud.di", "audit.trail", record_id=record["record_id"])
    forbidden(users, "C", "aud.di", "records.show", record_id=record["record_id"])
    forbidden(users, "B", "aud.di", "records.pull", record_id=record["record_id"], purpose="treatment")
    # Everyone may ask who they are.
    assert users.run("B", "res.cy", "users.whoami")["permissions"] == sorted(
        ["status", "records.list", "records.pull:research"])
    # Every refusal is logged with the user, role and method.
    log = cluster.log("C")
    assert '"event": "auth.denied"' in log and '"user": "clerk.bo"' in log and '"method": "records.show"' in log


def test_every_method_is_refused_exactly_to_the_roles_not_allowed_it(cluster, users):
    roles = load_roles(None, CATALOGUE)
    for role in ("admin", "clinician", "clerk", "researcher", "auditor", "patient"):
        extra = {"empi": "E" + "Q" * 24} if role == "patient" else {}
        users.add("B", f"every.{role}", role, **extra)

        async def sweep(role=role):
            async with ApiClient.connect(cluster.configs["B"], user=f"every.{role}",
                                         credential=users.credentials["B", f"every.{role}"]) as client:
                refused = set()
                for method in sorted(METHODS - {"users.revoke", "users.rotate"}):
                    try:
                        await client.call(method)
                    except ApiError as exc:
                        if exc.reason == "forbidden":
                            refused.add(method)
                return refused

        refused = trio.run(sweep)
        # A call without parameters: a scoped permission (audit.trail:patient) covers what it asks.
        expected = {m for m in METHODS - {"users.revoke", "users.rotate"}
                    if m not in ALWAYS and (not roles.get(role).permits(m, scope_of(m, {})) or role == "patient")}
        assert refused == expected, role


def test_managing_users_hands_out_no_more_than_ones_own_role(cluster, users):
    users.add("A", "help.jo", "helpdesk")
    added = users.run("A", "help.jo", "users.add", name="help.kim", role="helpdesk")
    assert added["role"] == "helpdesk" and added["credential"]
    assert "may not manage users of role admin" in forbidden(users, "A", "help.jo", "users.add", name="boss",
                                                            role="admin")
    forbidden(users, "A", "help.jo", "users.add", name="nurse.x", role="nurse")  # nurses pull; helpdesk may not
    forbidden(users, "A", "help.jo", "users.rotate", name="admin")
    forbidden(users, "A", "help.jo", "users.revoke", name="nurse.ed")
    assert users.run("A", "help.jo", "users.revoke", name="help.kim")["active"] is False


def test_the_owners_policy_decides_on_the_requesting_users_role(cluster, users, recorded):
    # A's roles let a nurse pull for treatment; C's packaged policy names clinicians and admins only.
    with pytest.raises(ApiError) as refused:
        users.run("A", "nurse.ed", "records.pull", record_id=recorded[0]["record_id"], purpose="treatment")
    assert refused.value.reason == "policy"
    trio.run(cluster.wait_caught_up, ["R"])  # the owner committed the refusal before it answered
    trail = trio.run(lambda: cluster.call("R", "audit.trail", record_id=recorded[0]["record_id"]))
    nurse = [e for e in trail if e["event"] == "access" and e["user_role"] == "nurse"]
    assert [(e["who"], e["decision"], e["reason"]) for e in nurse] == [("A", "refused", "policy")]


def test_a_leaked_copy_traces_to_the_user_who_pulled_it(cluster, users, recorded, tmp_path):
    record = recorded[2]
    pulled = users.run("B", "dr.ana", "records.pull", record_id=record["record_id"], purpose="treatment")
    # Another pull of theirs, for their own trail below (the test stands alone).
    users.run("B", "dr.ana", "records.pull", record_id=recorded[0]["record_id"], purpose="treatment")
    leaked = tmp_path / "leak.json"
    leaked.write_text(json.dumps({"resource": pulled["resource"], "salt": pulled["salt"]}))
    # The regulator finds the institution and its pseudonym for the user...
    traced = cli("audit", "trace-leak", leaked, "--config", cluster.configs["R"].path, "--json")
    assert traced.returncode == 0, traced.stderr
    found = json.loads(traced.stdout)
    ana = users.pseudonym("B", "dr.ana")
    assert found["users"] == [f"B/{ana}"]
    # ...and B's auditor resolves it; nobody else's node can.
    credential = tmp_path / "aud.cred"
    credential.write_text(users.credentials["B", "aud.di"])
    whois = cli("audit", "whois", ana, "--config", cluster.configs["B"].path, "--user", "aud.di", "--credential",
                credential, "--json")
    assert whois.returncode == 0, whois.stderr
    assert (json.loads(whois.stdout)["name"], json.loads(whois.stdout)["role"]) == ("dr.ana", "clinician")
    with pytest.raises(ApiError) as elsewhere:
        trio.run(lambda: cluster.call("C", "audit.whois", pseudonym=ana))
    assert elsewhere.value.reason == "not_found"
    # The regulator asks B on chain, for a stated case; B's policy tells the regulator, not C.
    asked = cli("audit", "whois", ana, "--at", "B", "--case", "inspection 42", "--config", cluster.configs["R"].path,
                "--json")
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    assert (answer["name"], answer["role"], answer["institution"]) == ("dr.ana", "clinician", "B")
    with pytest.raises(ApiError) as not_told:
        trio.run(lambda: cluster.call("C", "audit.whois", pseudonym=ana, at="B", case="curious"))
    assert not_told.value.reason == "policy"
    trio.run(cluster.wait_caught_up, ["A"])  # B committed its refusal before it answered
    asks = [e for e in trio.run(lambda: cluster.call("A", "audit.trail", user=ana)) if e["event"] == "whois"]
    assert [(e["who"], e["case"], e["reason"]) for e in asks] == [("R", "inspection 42", "granted"),
                                                                  ("C", "curious", "policy")]
    # The user's own trail: every pull they made, and what they recorded.
    trail = cli("audit", "trail", "--user", f"B/{ana}", "--config", cluster.configs["R"].path, "--json")
    assert trail.returncode == 0, trail.stderr
    events = json.loads(trail.stdout)
    assert {(e["event"], e["who"], e.get("record_id")) for e in events} >= {
        ("access", "B", record["record_id"]), ("access", "B", recorded[0]["record_id"])}
    clerk = users.pseudonym("C", "clerk.bo")
    recorded_by_clerk = trio.run(lambda: cluster.call("R", "audit.trail", user=clerk))
    assert {e["record_id"] for e in recorded_by_clerk if e["event"] == "recorded"} >= {
        r["record_id"] for r in recorded}
    # The same pseudonym as another institution's finds nothing of this one's.
    assert not [e for e in trio.run(lambda: cluster.call("R", "audit.trail", user=f"B/{ana}"))
                if e["who"] != "B" and e["event"] != "whois"]


def test_a_patient_sees_their_own_disclosures_and_nobody_elses(cluster, users, recorded):
    mine, other = recorded[2], next(r for r in recorded if r["empi"] != recorded[2]["empi"])
    users.add("C", "pat.fay", "patient", empi=mine["empi"])
    disclosures = users.run("C", "pat.fay", "audit.disclosures", empi=mine["empi"])
    assert [(d["who"], d["user"], d["user_role"]) for d in disclosures if d["record_id"] == mine["record_id"]] == [
        ("B", users.pseudonym("B", "dr.ana"), "clinician")]
    assert users.run("C", "pat.fay", "records.list", empi=mine["empi"])
    assert "not their EMPI" in forbidden(users, "C", "pat.fay", "audit.disclosures", empi=other["empi"])
    forbidden(users, "C", "pat.fay", "records.list", empi=other["empi"])
    forbidden(users, "C", "pat.fay", "audit.trail", record_id=mine["record_id"])
    forbidden(users, "C", "pat.fay", "records.show", record_id=mine["record_id"])
    # The patient manages their own consent through their hospital; the chain shows them by pseudonym.
    granted = users.run("C", "pat.fay", "consent.grant", empi=mine["empi"], to="A", purposes=["research"],
                        scope=["*"], until=0)
    trio.run(lambda: cluster.wait_height(["R"], granted["height"]))
    block = trio.run(lambda: cluster.call("R", "block.get", height=granted["height"]))
    tx = next(t for t in block["txs"] if t["id"] == granted["tx_id"])
    assert tx["actor"] == users.pseudonym("C", "pat.fay")
    forbidden(users, "C", "pat.fay", "consent.grant", empi=other["empi"], to="A", purposes=["research"],
              scope=["*"], until=0)


def test_a_revoked_user_is_refused_at_once_and_a_rotated_credential_stops_working(cluster, users):
    users.add("B", "dr.gus", "clinician")

    async def go():
        config = cluster.configs["B"]
        async with ApiClient.connect(config, user="dr.gus", credential=users.credentials["B", "dr.gus"]) as gus:
            assert (await gus.call("users.whoami"))["name"] == "dr.gus"
            await cluster.call("B", "users.revoke", name="dr.gus")
            with pytest.raises(ApiError) as revoked:
                await gus.call("status")
            assert revoked.value.reason == "revoked"
        with pytest.raises(ApiError) as again:
            async with ApiClient.connect(config, user="dr.gus", credential=users.credentials["B", "dr.gus"]):
                pass
        assert again.value.reason == "revoked" and "revoked" in str(again.value)
        # Rotation: the old credential fails (401), the new one works.
        old = users.credentials["B", "clerk.bo"]
        rotated = await cluster.call("B", "users.rotate", name="clerk.bo")
        with pytest.raises(ApiError) as stale:
            async with ApiClient.connect(config, user="clerk.bo", credential=old):
                pass
        assert stale.value.reason == "unauthorized"
        users.credentials["B", "clerk.bo"] = rotated["credential"]
        assert (await users.call("B", "clerk.bo", "users.whoami"))["name"] == "clerk.bo"
        listed = {u["name"]: u for u in await cluster.call("B", "users.list")}
        assert not listed["dr.gus"]["active"] and listed["clerk.bo"]["active"] and "credential" not in listed["admin"]

    trio.run(go)
    assert '"reason": "revoked"' in cluster.log("B")


def test_guessing_credentials_is_slowed_and_logged_and_locks_nobody_out(cluster, users):
    users.add("B", "dr.hal", "clinician")

    async def go():
        config = cluster.configs["B"]
        started = trio.current_time()
        reasons = []
        for _ in range(FREE_FAILURES + 2):
            with pytest.raises(ApiError) as wrong:
                async with ApiClient.connect(config, user="dr.hal", credential="ehr_guess"):
                    pass
            reasons.append(wrong.value.reason)
        # Each failure is answered late, later once the name has failed a few times, and says so.
        assert trio.current_time() - started >= (FREE_FAILURES - 1) * FAILURE_DELAY + 2 * FAILURE_DELAY * 2
        assert reasons == ["unauthorized"] * (FREE_FAILURES - 1) + ["throttled"] * 3
        assert "answered after" in str(wrong.value)
        # The right credential is accepted at once all the same: guessing locks nobody out.
        assert (await users.call("B", "dr.hal", "users.whoami"))["name"] == "dr.hal"
        # Guessing in parallel waits its turn: eight wrong guesses at once take at least two delays.
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for k in range(8):
                nursery.start_soon(guess, config, k)
        assert trio.current_time() - started >= 2 * FAILURE_DELAY

    async def guess(config, k):
        with pytest.raises(ApiError):
            async with ApiClient.connect(config, user=f"nobody{k}", credential="ehr_guess"):
                pass

    trio.run(go)
    log = cluster.log("B")
    assert '"reason": "bad_credential"' in log and '"throttled": true' in log and '"user": "dr.hal"' in log


def test_no_user_name_or_credential_is_on_chain(cluster, users, recorded):
    trio.run(lambda: cluster.wait_height(["A", "B", "C", "R"], 1))
    blocks = sqlite3.connect(cluster.configs["R"].data_dir / "blocks.sqlite3")
    raw = b"".join(bytes(v) for row in blocks.execute("SELECT * FROM blocks") for v in row
                   if isinstance(v, (bytes, memoryview)))
    assert len(raw) > 10_000
    for (_node, name), credential in users.credentials.items():
        assert name.encode() not in raw and credential.encode() not in raw
    # Their pseudonyms are sealed in the blocks with the rest of each transaction; members index them.
    pseudonym = pseudonym_bytes(users.pseudonym("C", "clerk.bo"))
    assert pseudonym not in raw
    state = sqlite3.connect(cluster.configs["R"].data_dir / "state.sqlite3")
    assert state.execute("SELECT COUNT(*) FROM actions WHERE actor = ?", (pseudonym,)).fetchone()[0] > 0


def test_the_cli_adds_users_and_acts_as_them(cluster, tmp_path):
    config = cluster.configs["C"].path
    credential = tmp_path / "ivy.cred"
    added = cli("users", "add", "ivy", "--role", "auditor", "--out", credential, "--config", config)
    assert added.returncode == 0, added.stderr
    assert credential.read_text().strip() not in added.stdout + added.stderr
    assert oct(credential.stat().st_mode & 0o777) == "0o600"
    env = {**os.environ, "EHRNODE_USER": "ivy", "EHRNODE_CREDENTIAL": str(credential)}
    whoami = cli("users", "whoami", "--config", config, "--json", env=env)
    assert whoami.returncode == 0 and json.loads(whoami.stdout)["role"] == "auditor"
    refused = cli("users", "add", "x", "--role", "admin", "--config", config, env=env)
    assert refused.returncode == 2 and "may not call users.add" in refused.stderr
    wrong = tmp_path / "wrong.cred"
    wrong.write_text("ehr_not-it")
    denied = cli("status", "--config", config, "--user", "ivy", "--credential", wrong)
    assert denied.returncode == 2 and "wrong credential for user ivy" in denied.stderr
    missing = cli("status", "--config", config, "--user", "ivy")
    assert missing.returncode == 2 and "no credential for user ivy" in missing.stderr
    listed = cli("users", "list", "--config", config)
    assert listed.returncode == 0 and "ivy" in listed.stdout and "auditor" in listed.stdout
