"""Recording on a real 4-node consortium: Synthea patients in, anchors everywhere, no PHI on chain."""

import base64
import json
import os
import re
from functools import partial

import pytest
import trio

from ehrnode.records.deid import Deidentifier, load_profile
from ehrnode.records.deid.dates import shift_date
from ehrnode.records.keys import RecordKeys
from ehrnode.records.vault import Vault
from tests.commands import cli as run_cli

from ..daemon.cluster import running
from ..datasets import SYNTHEA

NON_PATIENT = {"Organization", "Practitioner", "Location"}


cli = partial(run_cli, timeout=600)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running(tmp_path_factory.mktemp("recording") / "consortium")


@pytest.fixture(scope="module")
def ingest(cluster):
    """Every Synthea file recorded at A through the CLI, waiting for every anchor."""
    files = sorted(SYNTHEA.glob("*.ndjson"))
    result = cli("records", "add", "--config", cluster.configs["A"].path, "--json", *files)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout), result.stderr


def _patients():
    return [json.loads(line) for line in (SYNTHEA / "Patient.ndjson").read_text().splitlines()]


def _dates_of(patient_id):
    """Every calendar day in the raw Synthea resources that mention the patient."""
    days = set()
    for path in SYNTHEA.glob("*.ndjson"):
        for line in path.read_text().splitlines():
            if patient_id in line:
                days.update(re.findall(r'"(\d{4}-\d{2}-\d{2})', line))
    return days


def _phi(patient):
    """The identifying strings of a raw Synthea Patient, as a leak scan looks for them."""
    values = set()
    for name in patient.get("name", []):
        values.update(name.get("given", []))
        values.add(name.get("family"))
    for ext in patient.get("extension", []):
        if ext["url"].endswith("patient-mothersMaidenName"):
            values.update(ext["valueString"].split())
    for identifier in patient.get("identifier", []):
        values.add(identifier["value"])
    values.add(patient["birthDate"])
    for address in patient.get("address", []):
        values.update(address.get("line", []))
    for telecom in patient.get("telecom", []):
        values.add(telecom["value"])
    values.add(patient["id"])
    return {v for v in values if v and len(v) >= 4}


def _line_id(source):
    """The id of the Patient on line N of Patient.ndjson (sources are 'Patient.ndjson:N')."""
    line = int(source.rsplit(":", 1)[1])
    return json.loads((SYNTHEA / "Patient.ndjson").read_text().splitlines()[line - 1])["id"]


def _expected_counts():
    counts = {}
    for path in SYNTHEA.glob("*.ndjson"):
        kind = path.stem
        if kind not in NON_PATIENT:
            counts[kind] = sum(1 for line in path.read_text().splitlines() if line.strip())
    return counts


def test_every_resource_is_recorded_and_anchored_on_every_node(cluster, ingest):
    rows, stderr = ingest
    counts = {}
    for row in rows:
        counts[row["resource_type"]] = counts.get(row["resource_type"], 0) + 1
        assert row["status"] == "recorded" and row["height"] is not None, row
    assert counts == _expected_counts()
    assert "skipped" in stderr  # Organization, Practitioner and Location are reported, not recorded
    by_empi = {}
    for row in rows:
        by_empi.setdefault(row["empi"], set()).add(row["record_id"])
    assert len(by_empi) == 12

    async def listings(name):
        out = {}
        for empi in by_empi:
            out[empi] = await cluster.call(name, "records.list", empi=empi)
        return out

    async def all_listings():
        return {name: await listings(name) for name in cluster.names}

    views = trio.run(all_listings)
    for name, view in views.items():
        for empi, anchors in view.items():
            assert {a["record_id"] for a in anchors} == by_empi[empi], name
            assert all(a["institution"] == "A" and a["height"] > 0 for a in anchors)
        assert view == views["A"], f"{name} indexes anchors differently from A"


def test_no_phi_reaches_any_block_store_or_ledger(cluster, ingest):
    needles = set()
    for patient in _patients():
        needles |= _phi(patient)
    assert len(needles) > 100
    for name in cluster.names:
        data = cluster.configs[name].data_dir
        for path in sorted(data.glob("*.sqlite3*")):
            if path.name.startswith("vault"):
                continue  # the vault holds the raw records, encrypted; it never leaves A
            blob = path.read_bytes()
            found = [n for n in needles if n.encode() in blob]
            assert not found, f"{name}/{path.name} holds {found[:5]}"


def test_released_resources_hold_no_phi(cluster, ingest):
    rows, _ = ingest
    config = cluster.configs["A"]
    vault = Vault(config.data_dir / "vault.sqlite3",
                  RecordKeys.load(config.master_key_path, config.consortium_key_path), member=None)
    try:
        released = []
        for row in rows:
            _, _, resource, _ = vault.read(bytes.fromhex(row["record_id"]))
            released.append(resource)
    finally:
        vault.close()
    def text_of(resources):
        text = json.dumps(resources, ensure_ascii=False)
        # Attachments are dropped; were any left, their decoded text would be scanned too.
        for resource in resources:
            for content in resource.get("content", []):
                data = content.get("attachment", {}).get("data")
                if data:
                    text += base64.b64decode(data).decode("utf-8", "replace")
        return text

    everything = text_of(released)
    deid = Deidentifier(load_profile(), RecordKeys.load(config.master_key_path, config.consortium_key_path).deid)
    empis = [row["empi"] for row in rows]
    for patient in _patients():
        needles = _phi(patient)
        # A shifted clinical date of one patient may equal another's birth date by chance, so
        # the birth date is looked for in the patient's own records; the rest everywhere.
        found = [n for n in needles - {patient["birthDate"]} if n in everything]
        assert not found, f"released records hold {found[:5]}"
        empi = next(row["empi"] for row in rows
                    if row["resource_type"] == "Patient" and _line_id(row["source"]) == patient["id"])
        own = text_of([r for r, e in zip(released, empis, strict=True) if e == empi])
        # Another of the patient's dates, shifted by its offset, may land on the birth date by
        # chance (an offset of -335 days and a visit 335 days after birth): not a leak, and then
        # the released text cannot tell; otherwise the birth date must not be there at all.
        offset = deid.date_shift_days(patient["id"])
        if not any(shift_date(d, offset) == patient["birthDate"] for d in _dates_of(patient["id"])):
            assert patient["birthDate"] not in own


def test_vault_verifies_against_the_chain_and_reingest_is_harmless(cluster, ingest):
    rows, _ = ingest
    config = cluster.configs["A"].path
    result = cli("vault", "verify", "--config", config, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["entries"] == len(rows) and report["anchored"] == len(rows)

    again = cli("records", "add", "--config", config, "--json", SYNTHEA / "Patient.ndjson")
    assert again.returncode == 0, again.stderr
    assert {r["status"] for r in json.loads(again.stdout)} == {"already_recorded"}

    patient_row = next(r for r in rows if r["resource_type"] == "Patient")
    shown = cli("records", "show", "--config", config, "--json", patient_row["record_id"])
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["resource"]["name"] and "name" not in record["deidentified"]
    assert record["anchor"]["commitment"] == record["commitment"]

    listed = cli("records", "list", "--config", cluster.configs["C"].path, "--json", "--empi", patient_row["empi"])
    assert listed.returncode == 0
    assert set(json.loads(listed.stdout)[0]) == {"record_id", "empi", "institution", "recorded_at", "resource_type",
                                                 "commitment", "height", "setting", "tx_id"}


def _vault_count(cluster):
    result = cli("vault", "verify", "--config", cluster.configs["B"].path, "--json", "--no-decrypt")
    return json.loads(result.stdout)["entries"]


def _write(path, text):
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return path


def test_bad_input_gets_a_clear_error_and_writes_nothing(cluster, tmp_path):
    config = cluster.configs["B"].path
    patient = json.loads((SYNTHEA / "Patient.ndjson").read_text().splitlines()[0])
    condition = json.loads((SYNTHEA / "Condition.ndjson").read_text().splitlines()[0])
    encounter = json.loads((SYNTHEA / "Encounter.ndjson").read_text().splitlines()[0])
    before = _vault_count(cluster)
    big = tmp_path / "big.ndjson"
    with open(big, "wb") as fh:
        fh.truncate(100 * 1024 * 1024)
    cases = {
        "truncated": (_write(tmp_path / "t.json", json.dumps(patient)[:-40]), "t.json"),
        "unknown type": (_write(tmp_path / "u.json", json.dumps({"resourceType": "Spaceship", "id": "x"})),
                         "Spaceship"),
        "missing required": (_write(tmp_path / "m.ndjson", json.dumps(patient) + "\n" + json.dumps(
            {k: v for k, v in encounter.items() if k not in ("status", "class")}) + "\n"), "m.ndjson:2"),
        "too large": (big, "big.ndjson"),
        "not utf-8": (_write(tmp_path / "n.ndjson", json.dumps(patient).encode() + b"\n\xff\xfe{}\n"), "n.ndjson:2"),
        "absent patient": (_write(tmp_path / "bundle.json", json.dumps({
            "resourceType": "Bundle", "type": "collection",
            "entry": [{"fullUrl": f"urn:uuid:{condition['id']}", "resource": condition | {
                "subject": {"reference": "Patient/not-recorded-anywhere"}}}],
        })), "Patient/not-recorded-anywhere"),
    }
    for what, (path, named) in cases.items():
        result = cli("records", "add", "--config", config, path)
        assert result.returncode == 2, (what, result.stdout, result.stderr)
        assert named in result.stderr, (what, result.stderr)
        assert "Traceback" not in result.stderr
    assert _vault_count(cluster) == before
    os.unlink(big)


def test_skip_invalid_records_the_rest_and_reports_what_it_skipped(cluster, tmp_path):
    config = cluster.configs["C"].path
    patient = json.loads((SYNTHEA / "Patient.ndjson").read_text().splitlines()[1])
    conditions = [json.loads(line) for line in (SYNTHEA / "Condition.ndjson").read_text().splitlines()]
    mine = [c for c in conditions if c["subject"]["reference"] == f"Patient/{patient['id']}"][:2]
    broken = dict(mine[1], resourceType="Conditio")
    path = _write(tmp_path / "mixed.ndjson", "\n".join(json.dumps(r) for r in (patient, mine[0], broken)) + "\n")
    refused = cli("records", "add", "--config", config, path)
    assert refused.returncode == 2 and "mixed.ndjson:3" in refused.stderr
    result = cli("records", "add", "--config", config, "--skip-invalid", "--json", path)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["resource_type"] for r in rows] == ["Patient", "Condition"]
    assert "mixed.ndjson:3" in result.stderr


def test_a_bulk_export_folder_with_an_empty_type_file_records_the_rest_and_says_so(cluster, tmp_path):
    config = cluster.configs["C"].path
    patient = json.loads((SYNTHEA / "Patient.ndjson").read_text().splitlines()[3])
    conditions = [json.loads(line) for line in (SYNTHEA / "Condition.ndjson").read_text().splitlines()]
    mine = [c for c in conditions if c["subject"]["reference"] == f"Patient/{patient['id']}"][:1]
    export = tmp_path / "export"
    export.mkdir()
    _write(export / "Patient.ndjson", json.dumps(patient) + "\n")
    _write(export / "Condition.ndjson", "".join(json.dumps(c) + "\n" for c in mine))
    _write(export / "Observation.ndjson", "")
    (export / "manifest.txt").write_text("not FHIR")   # neither read nor refused: not a FHIR file
    result = cli("records", "add", "--config", config, "--json", export)
    assert result.returncode == 0, result.stderr
    assert sorted(r["resource_type"] for r in json.loads(result.stdout)) == ["Condition", "Patient"]
    assert f"empty: {export / 'Observation.ndjson'}" in result.stderr
    assert "skipped" not in result.stderr


def test_a_regulator_does_not_record(cluster):
    result = cli("records", "add", "--config", cluster.configs["R"].path, SYNTHEA / "Patient.ndjson")
    assert result.returncode == 2 and "does not record" in result.stderr


def test_the_node_itself_refuses_invalid_input_sent_past_the_cli(cluster):
    """The API validates too: a client that skips the CLI's checks writes nothing either."""
    patient = json.loads((SYNTHEA / "Patient.ndjson").read_text().splitlines()[2])
    encounter = next(json.loads(line) for line in (SYNTHEA / "Encounter.ndjson").read_text().splitlines()
                     if f"Patient/{patient['id']}" in line)
    before = _vault_count(cluster)

    async def go():
        from ehrnode.client import ApiClient, ApiError

        async with ApiClient.connect(cluster.configs["B"]) as client:
            bad_inputs = {
                "unknown type": [{"resourceType": "Spaceship", "id": "x"}],
                "missing required": [patient, {k: v for k, v in encounter.items() if k not in ("status", "class")}],
                "no id": [patient, {k: v for k, v in encounter.items() if k != "id"}],
            }
            for what, resources in bad_inputs.items():
                items = [{"source": f"{what}:{i}", "resource": r} for i, r in enumerate(resources)]
                with pytest.raises(ApiError) as err:
                    await client.call("records.add", items=items)
                assert err.value.reason == "invalid_input", what
                assert f"{what}:{len(resources) - 1}" in str(err.value), (what, str(err.value))
            with pytest.raises(ApiError, match=r"items\[0\] must be"):
                await client.call("records.add", items=[{"source": "x", "resource": "not an object"}])
            with pytest.raises(ApiError, match="nothing to record"):
                await client.call("records.add", items=[])
            # Staged input belongs to its connection and is all recorded, or none of it.
            await client.call("records.stage", items=[{"source": "s:1", "resource": patient}])
            with pytest.raises(ApiError):
                await client.call("records.add", items=[{"source": "s:2", "resource": {"resourceType": "Nope"}}])
            # Identical sources are not confused: each record keeps its own content, and a
            # setting that is not a known encounter class does not reach the chain as it is.
            odd = dict(encounter, id="odd-class", **{"class": dict(encounter["class"], code="555-12-3456")})
            done = await client.call("records.add", items=[{"source": "same", "resource": patient},
                                                           {"source": "same", "resource": encounter},
                                                           {"source": "same", "resource": odd}])
            return done

    done = trio.run(go)
    assert [r["resource_type"] for r in done["records"]] == ["Patient", "Encounter", "Encounter"]
    assert _vault_count(cluster) == before + 3

    async def shown():
        out = []
        for row in done["records"]:
            out.append(await cluster.call("B", "records.show", record_id=row["record_id"]))
        return out

    records = trio.run(shown)
    assert [r["resource"]["id"] for r in records] == [patient["id"], encounter["id"], "odd-class"]
    assert [r["setting"] for r in records] == ["unknown", encounter["class"]["code"], "other"]


def test_staged_parts_are_validated_as_they_come_and_recorded_all_at_once(cluster):
    """Each staged part large enough for the worker processes is validated while the next one is
    sent, and its Patients' OPRF evaluations are asked for; ``records.add`` still records the
    whole input or none of it, and names a problem found in any part. Input dropped by a refusal
    and staged again is validated afresh."""
    from ehrnode import synthetic
    from ehrnode.client import ApiClient, ApiError
    from ehrnode.records.workers import POOL_THRESHOLD

    people = synthetic.people(2 * (POOL_THRESHOLD // 4 + 1) + 1, seed=77)
    half = len(people) // 2
    first = [r for p in people[:half] for r in synthetic.patient_resources(p, "B", visits=1)]
    second = [r for p in people[half:-1] for r in synthetic.patient_resources(p, "B", visits=1)]
    last = synthetic.patient_resources(people[-1], "B", visits=1)
    assert len(first) >= POOL_THRESHOLD and len(second) >= POOL_THRESHOLD
    broken = {k: v for k, v in second[-3].items() if k != "status"}  # an Encounter needs its status
    assert second[-3]["resourceType"] == "Encounter"

    def part(label, resources):
        return [{"source": f"{label}:{i}", "resource": r} for i, r in enumerate(resources)]

    before = _vault_count(cluster)

    async def go():
        async with ApiClient.connect(cluster.configs["B"]) as client:
            await client.call("records.stage", items=part("one", first))
            await client.call("records.stage", items=part("two", [*second[:-3], broken, *second[-2:]]))
            with pytest.raises(ApiError) as err:
                await client.call("records.add", items=part("three", last))
            assert err.value.reason == "invalid_input", str(err.value)
            assert f"two:{len(second) - 3}" in str(err.value) and "one:" not in str(err.value)
            # Nothing stays staged after a refusal: the same parts, mended, are recorded at once.
            await client.call("records.stage", items=part("one", first))
            await client.call("records.stage", items=part("two", second))
            return await client.call("records.add", items=part("three", last))

    done = trio.run(go)
    assert [r["source"] for r in done["records"]] == \
        [f"one:{i}" for i in range(len(first))] + [f"two:{i}" for i in range(len(second))] + \
        [f"three:{i}" for i in range(len(last))]
    assert _vault_count(cluster) == before + len(first) + len(second) + len(last)
    recorded = [json.loads(line) for line in cluster.log_path("B").read_text().splitlines()
                if '"records.recorded"' in line]
    assert recorded[-1]["records"] == len(done["records"])
    assert recorded[-1]["checked_ahead"] == len(first) + len(second)  # both parts, validated ahead
    # The staged Patients' OPRF evaluations were asked for as their parts came.
    ahead = [json.loads(line) for line in cluster.log_path("B").read_text().splitlines()
             if '"records.evaluated_ahead"' in line]
    assert ahead and all(a["patients"] > 0 and a["inputs"] > 0 for a in ahead)


def test_empi_across_institutions_and_its_curation_commands(cluster, ingest, tmp_path):
    rows, _ = ingest
    a_empi = {}
    for row in rows:
        if row["resource_type"] == "Patient":
            a_empi[_line_id(row["source"])] = row["empi"]
    # B registers the same 12 people with typos, given names in another order, another phone
    # and no SSN: every one gets A's EMPI, on demographics alone.
    patients = _patients()
    typoed = []
    for p in patients:
        p = json.loads(json.dumps(p))
        family = p["name"][0]["family"]
        p["name"][0]["family"] = family[:2] + family[3] + family[2] + family[4:]
        p["name"][0]["given"] = list(reversed(p["name"][0].get("given", [])))
        p["telecom"] = [{"system": "phone", "value": "555-000-1234"}]
        p["identifier"] = [i for i in p["identifier"] if i.get("system") != "http://hl7.org/fhir/sid/us-ssn"]
        p["id"] = "b-" + p["id"][2:]
        typoed.append(p)
    path = _write(tmp_path / "b-patients.ndjson", "".join(json.dumps(p) + "\n" for p in typoed))
    result = cli("records", "add", "--config", cluster.configs["B"].path, "--json", path)
    assert result.returncode == 0, result.stderr
    b_rows = json.loads(result.stdout)
    assert [r["empi"] for r in b_rows] == [a_empi[p["id"]] for p in patients]

    config = cluster.configs["A"].path

    def listing(empi, name="C"):
        out = cli("records", "list", "--config", cluster.configs[name].path, "--json", "--empi", empi)
        return {r["record_id"] for r in json.loads(out.stdout)}

    looked = cli("empi", "lookup", "--config", config, "--json", _write(tmp_path / "p.json", json.dumps(typoed[0])))
    assert looked.returncode == 0, looked.stderr
    found = json.loads(looked.stdout)
    assert found["empi"] == a_empi[patients[0]["id"]] and found["grade"] in ("certain", "probable")

    first, second = a_empi[patients[0]["id"]], a_empi[patients[1]["id"]]
    before = {first: listing(first, "A"), second: listing(second, "A")}
    assert before[first] and before[second] and not before[first] & before[second]
    # B holds both patients too (and C, which recorded one of them in other tests): A's merge is
    # held until every other holder agrees.
    merged = cli("empi", "merge", "--config", config, "--json", second, first)
    assert merged.returncode == 0, merged.stderr
    merge_tx, waiting = json.loads(merged.stdout)["tx_id"], json.loads(merged.stdout)["waiting"]
    assert "B" in waiting and "A" not in waiting and listing(first, "A") == before[first]
    held = cli("empi", "requests", "--config", cluster.configs["B"].path, "--json")
    assert [(r["request"], r["kind"], r["waiting"]) for r in json.loads(held.stdout)] == [(merge_tx, "merge", waiting)]
    own = cli("empi", "accept", "--config", config, merge_tx)
    assert own.returncode == 2 and "own_request" in own.stderr
    for name in waiting:
        accepted = cli("empi", "accept", "--config", cluster.configs[name].path, merge_tx)
        assert accepted.returncode == 0, accepted.stderr

    assert listing(first, "A") == listing(second, "A") == before[first] | before[second]
    assert cli("empi", "unmerge", "--config", config, merge_tx).returncode == 0
    assert listing(first, "A") == before[first] and listing(second, "A") == before[second]
    history = cli("empi", "history", "--config", config, "--json", first)
    assert [e["event"] for e in json.loads(history.stdout)][-3 - len(waiting):] == [
        "merge_requested", *["accepted"] * len(waiting), "merged", "unmerged"]
    refused = cli("empi", "merge", "--config", config, first, first)
    assert refused.returncode == 2 and "invalid" in refused.stderr
    review = cli("empi", "review", "--config", config, "--json")
    assert review.returncode == 0 and isinstance(json.loads(review.stdout), list)


def test_consent_is_recorded_by_the_patients_institution_and_shown_everywhere(cluster, ingest):
    rows, _ = ingest
    empi = next(r["empi"] for r in rows if r["resource_type"] == "Patient")
    a, c, r = (cluster.configs[n].path for n in ("A", "C", "R"))
    granted = cli("consent", "grant", "--config", a, "--json", "--empi", empi, "--to", "B",
                  "--purpose", "treatment", "--purpose", "emergency", "--scope", "Condition,Observation",
                  "--until", "2099-12-31")
    assert granted.returncode == 0, granted.stderr
    assert cli("consent", "revoke", "--config", a, "--empi", empi, "--to", "*", "--purpose", "research").returncode == 0
    # C holds no record of this patient; the regulator records no consent; a bad date or purpose is refused.
    refused = cli("consent", "grant", "--config", c, "--empi", empi, "--to", "B")
    assert refused.returncode == 2 and "not_holder" in refused.stderr
    assert cli("consent", "grant", "--config", r, "--empi", empi, "--to", "B").returncode == 2
    assert cli("consent", "grant", "--config", a, "--empi", empi, "--to", "B", "--until", "soon").returncode == 2
    assert cli("consent", "grant", "--config", a, "--empi", empi, "--to", "B", "--purpose", "fun").returncode == 2
    shown = cli("consent", "show", "--config", r, "--json", "--empi", empi)
    entries = json.loads(shown.stdout)
    assert [(e["action"], e["grantee"], e["purposes"]) for e in entries] == [
        ("grant", "B", ["emergency", "treatment"]), ("revoke", "*", ["research"])]
    assert entries[0]["scope"] == ["Condition", "Observation"] and entries[0]["until"] > 4_000_000_000_000
