"""The FHIR R4 REST interface on a real four-member consortium (TLS on), driven by an HTTP client
as a hospital's systems would, every response checked against the FHIR R4 models."""

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
from fhir.resources.R4B import get_fhir_model_class

from ehrnode.client import ApiError
from ehrnode.localnet import LocalConsortium
from ehrnode.net.tls import client_context
from tests.daemon.cluster import running
from tests.datasets import SYNTHEA

FHIR_JSON = {"content-type": "application/fhir+json"}
EMPI = "urn:ehrnode:empi"


def valid(resource: dict) -> dict:
    """``resource``, after checking it (and every resource a Bundle carries) against the R4 models."""
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    for entry in resource.get("entry", []) if resource["resourceType"] == "Bundle" else []:
        for part in (entry.get("resource"), entry.get("response", {}).get("outcome")):
            if part is not None:
                valid(part)
    return resource


def outcome(response: httpx.Response, status: int) -> dict:
    """The OperationOutcome of a refusal with ``status``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = valid(response.json())
    assert body["resourceType"] == "OperationOutcome"
    return body["issue"][0]


def synthea_patient() -> list[dict]:
    """One Synthea patient and a few of their records."""
    patient = json.loads((SYNTHEA / "Patient.ndjson").read_text().splitlines()[0])
    wanted = f"Patient/{patient['id']}"
    picked = [patient]
    for rtype in ("Encounter", "Condition", "Immunization"):
        lines = (SYNTHEA / f"{rtype}.ndjson").read_text().splitlines()
        found = [r for r in map(json.loads, lines) if (r.get("subject") or r.get("patient"))["reference"] == wanted]
        picked += found[:3]
    return picked


def transaction(resources: list[dict], kind: str = "transaction") -> dict:
    return {"resourceType": "Bundle", "type": kind, "entry": [
        {"fullUrl": f"urn:uuid:{r['id']}", "resource": r, "request": {"method": "POST", "url": r["resourceType"]}}
        for r in resources]}


class Member:
    """One member's FHIR base URL, as ``status`` gives it, with a client trusting the consortium CA."""

    def __init__(self, cluster: LocalConsortium, name: str) -> None:
        self.cluster, self.name = cluster, name
        self.base = trio.run(lambda: cluster.status(name))["fhir"]
        config = cluster.configs[name]
        self.admin = (config.data_dir / "api.token").read_text().strip()
        self.http = httpx.Client(verify=client_context(config.tls.ca), timeout=90)

    def user(self, name: str, role: str, **extra) -> str:
        added = trio.run(lambda: self.cluster.call(self.name, "users.add", name=name, role=role, **extra))
        return added["credential"]

    def get(self, path: str, credential: str | None = None, **kw) -> httpx.Response:
        return self.http.get(f"{self.base}/{path}".rstrip("/"), headers=self._auth(credential, kw), **kw)

    def post(self, path: str, body, credential: str | None = None, **kw) -> httpx.Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {**FHIR_JSON, **self._auth(credential, kw)}
        return self.http.post(f"{self.base}/{path}".rstrip("/"), content=data, headers=headers, **kw)

    def _auth(self, credential: str | None, kw: dict) -> dict:
        return {"authorization": f"Bearer {credential or self.admin}", **kw.pop("headers", {})}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalConsortium]:
    yield from running(tmp_path_factory.mktemp("fhir") / "consortium")


@pytest.fixture(scope="module")
def members(cluster) -> dict[str, Member]:
    found = {name: Member(cluster, name) for name in ("A", "B", "C", "R")}
    yield found
    for member in found.values():
        member.http.close()


@pytest.fixture(scope="module")
def recorded(members) -> dict:
    """A Synthea patient recorded at B with a transaction Bundle: the raw resources and the locations."""
    resources = synthea_patient()
    response = members["B"].post("", transaction(resources))
    assert response.status_code == 200, response.text
    body = valid(response.json())
    assert body["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses == ["201 Created"] * len(resources)
    locations = [e["response"]["location"] for e in body["entry"]]
    assert [loc.split("/")[0] for loc in locations] == [r["resourceType"] for r in resources]
    # B answered once it had committed them: every member has once it has committed as far.
    cluster = members["B"].cluster
    trio.run(cluster.wait_height, ["A", "B", "C", "R"], trio.run(cluster.height, "B"))
    return {"resources": resources, "locations": locations}


def test_the_base_url_and_capability_statement(members):
    b = members["B"]
    assert b.base.startswith("https://127.0.0.1:") and b.base.endswith("/fhir")
    response = b.http.get(f"{b.base}/metadata")  # no credential needed to learn what is implemented
    statement = valid(response.json())
    assert response.status_code == 200 and statement["resourceType"] == "CapabilityStatement"
    rest = statement["rest"][0]
    by_type = {r["type"]: r for r in rest["resource"]}
    assert by_type["Patient"]["operation"][0]["name"] == "match"
    assert {i["code"] for i in by_type["Consent"]["interaction"]} >= {"search-type", "create"}
    assert {i["code"] for i in by_type["Observation"]["interaction"]} == {"read"}
    assert "Organization" not in by_type  # not a record type: nothing to read
    assert {i["code"] for i in rest["interaction"]} == {"batch", "transaction"}


def test_without_a_valid_credential_nothing_is_answered(members):
    b = members["B"]
    issue = outcome(b.http.get(f"{b.base}/DocumentReference", params={"patient.identifier": f"{EMPI}|E{'A' * 24}"}),
                    401)
    assert issue["code"] == "login"
    refused = b.http.post(b.base, content=json.dumps(transaction(synthea_patient()[:1])).encode(),
                          headers={**FHIR_JSON, "authorization": "Bearer not-a-credential"})
    assert outcome(refused, 401)["code"] == "login"
    assert refused.headers["www-authenticate"].startswith("Bearer")


def test_match_list_pull_and_audit_across_the_consortium(members, recorded):
    """A clinician at A finds B's patient by demographics, lists their records, pulls one, and reads
    the trail, with nothing but the FHIR contract."""
    a = members["A"]
    clinician = a.user("dr-fhir", "clinician")
    patient = recorded["resources"][0]
    query = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": patient},
                                                        {"name": "count", "valueInteger": 3}]}
    found = a.post("Patient/$match", query, clinician)
    assert found.status_code == 200, found.text
    bundle = valid(found.json())
    assert bundle["type"] == "searchset" and bundle["total"] == 1
    match = bundle["entry"][0]
    identifier = match["resource"]["identifier"][0]
    assert identifier["system"] == EMPI
    assert match["search"]["score"] == 1.0
    assert match["search"]["extension"][0] == {"url": "http://hl7.org/fhir/StructureDefinition/match-grade",
                                               "valueCode": "certain"}
    assert set(match["resource"]) == {"resourceType", "id", "identifier"}  # no demographics leave B
    empi = identifier["value"]

    listed = a.get("DocumentReference", clinician, params={"patient.identifier": f"{EMPI}|{empi}"})
    documents = valid(listed.json())
    assert listed.status_code == 200 and documents["type"] == "searchset"
    refs = [e["resource"] for e in documents["entry"]]
    assert sorted(f"{d['type']['text']}/{d['masterIdentifier']['value']}" for d in refs) == sorted(
        recorded["locations"])
    assert {d["custodian"]["display"] for d in refs} == {"B"}
    condition = next(d for d in refs if d["type"]["text"] == "Condition")
    url = condition["content"][0]["attachment"]["url"]
    assert url == f"{a.base}/Condition/{condition['masterIdentifier']['value']}"

    pulled = a.http.get(url, headers={"authorization": f"Bearer {clinician}"})
    assert pulled.status_code == 200, pulled.text
    resource = valid(pulled.json())
    assert resource["resourceType"] == "Condition"
    assert patient["name"][0]["family"] not in pulled.text  # released de-identified
    access = pulled.headers["x-access-log"]

    trail = a.get("AuditEvent", clinician, params={"entity": condition["masterIdentifier"]["value"]})
    events = valid(trail.json())["entry"]
    reads = [e["resource"] for e in events if e["resource"]["action"] == "R"]
    def access_tx(event):
        return next(e["what"]["identifier"]["value"] for e in event["entity"]
                    if e["what"]["identifier"]["system"] == "urn:ehrnode:tx")

    assert [access_tx(e) for e in reads] == [access]
    assert reads[0]["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"
    trio.run(a.cluster.wait_height, ["R"], trio.run(a.cluster.height, "A"))  # R has the access A verified
    by_patient = valid(members["R"].get("AuditEvent", params={"patient.identifier": f"{EMPI}|{empi}"}).json())
    assert access in {access_tx(e["resource"]) for e in by_patient["entry"]}
    ids = [e["resource"]["id"] for e in by_patient["entry"]]
    assert len(ids) == len(set(ids))  # records anchored by one transaction are events of their own
    assert sum(e["resource"]["action"] == "C" for e in by_patient["entry"]) > 1

    # The clinician's role allows treatment and emergency pulls only.
    research = a.http.get(url, headers={"authorization": f"Bearer {clinician}", "x-purpose-of-use": "HRESCH"})
    assert outcome(research, 403)["code"] == "forbidden"
    assert outcome(a.http.get(url, headers={"authorization": f"Bearer {clinician}", "x-purpose-of-use": "FUN"}),
                   400)["code"] == "code-invalid"
    # The path says what the record is: a wrong type is not pulled.
    wrong = url.replace("/Condition/", "/Observation/")
    assert outcome(a.http.get(wrong, headers={"authorization": f"Bearer {clinician}"}), 404)["code"] == "not-found"


def test_consent_round_trip_and_a_refused_pull_names_its_access_log(members, recorded):
    a, b = members["A"], members["B"]
    encounter_location = next(loc for loc in recorded["locations"] if loc.startswith("Encounter/"))
    anchors = trio.run(lambda: b.cluster.call("B", "records.list", empi=_empi_of(members, recorded)))
    empi = anchors[0]["empi"]
    consent = {
        "resourceType": "Consent", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"identifier": {"system": EMPI, "value": empi}},
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
        "provision": {"type": "deny", "actor": [{
            "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                 "code": "IRCP"}]},
            "reference": {"reference": "Organization/A"}}],
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}]},
    }
    # What would not be recorded as it means is refused, and nothing is recorded.
    for change, why in (({"status": "draft"}, "only an active"),
                        ({"provision": {**consent["provision"], "period": {"start": "2030-01-01"}}}, "only end"),
                        ({"provision": {**consent["provision"], "period": {"end": "2001-01-01"}}}, "in the past")):
        refused = outcome(b.post("Consent", {**consent, **change}), 422)
        assert why in refused["details"]["text"]
    # A grant as long as a date can say (to the last day of 9999) is shown as it was recorded; a
    # later time cannot be recorded at all.
    lasting = {**consent, "provision": {"type": "permit", "period": {"end": "9999-12-31"}}}
    assert valid(b.post("Consent", lasting).json())["provision"]["period"]["end"] == "9999-12-31T23:59:59.999Z"
    with pytest.raises(ApiError) as too_late:
        trio.run(lambda: b.cluster.call("B", "consent.grant", empi=empi, to="*", until=2**62))
    assert "9999-12-31" in str(too_late.value)
    created = b.post("Consent", consent)  # then the withdrawal, for A's treatment: it stands
    assert created.status_code == 201, created.text
    stored = valid(created.json())
    assert created.headers["x-transaction"] == stored["id"]
    assert stored["provision"]["type"] == "deny"

    # B answered once it had committed the withdrawal; A lists it once it has committed that block.
    trio.run(a.cluster.wait_height, ["A"], trio.run(b.cluster.height, "B"))
    listed = valid(a.get("Consent", params={"patient.identifier": f"{EMPI}|{empi}"}).json())
    shown = [e["resource"] for e in listed["entry"] if e["resource"]["provision"]["type"] == "deny"]
    assert [(c["id"], c["provision"]["type"], c["provision"]["actor"][0]["reference"]["reference"],
             c["provision"]["purpose"][0]["code"]) for c in shown] == [(stored["id"], "deny", "Organization/A",
                                                                        "TREAT")]

    refused = a.get(encounter_location)
    issue = outcome(refused, 403)
    assert issue["code"] == "forbidden" and issue["details"]["text"] == "consent"
    trio.run(a.cluster.wait_caught_up, ["R"])  # the owner committed the refusal before it answered
    logged = trio.run(lambda: a.cluster.call("R", "audit.trail", record_id=encounter_location.split("/")[1]))
    assert [(e["decision"], e["tx_id"]) for e in logged if e["event"] == "access"] == [("refused",
                                                                                        issue["diagnostics"])]
    # An emergency is not a treatment purpose: it is served, and logged as an override.
    emergency = a.get(encounter_location, headers={"x-purpose-of-use": "ETREAT"})
    assert emergency.status_code == 200 and valid(emergency.json())["resourceType"] == "Encounter"


def _empi_of(members, recorded) -> str:
    patient = recorded["resources"][0]
    query = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": patient}]}
    return valid(members["B"].post("Patient/$match", query).json())["entry"][0]["resource"]["id"]


def test_a_patient_sees_only_their_own(members, recorded):
    a = members["A"]
    empi = _empi_of(members, recorded)
    own = a.user("patient-fhir", "patient", empi=empi)
    listed = a.get("DocumentReference", own, params={"patient.identifier": f"{EMPI}|{empi}"})
    assert listed.status_code == 200 and valid(listed.json())["total"] == len(recorded["locations"])
    other = f"{EMPI}|E{'B' * 24}"
    assert outcome(a.get("DocumentReference", own, params={"patient.identifier": other}), 403)["code"] == "forbidden"
    assert outcome(a.get("AuditEvent", own, params={"entity": recorded["locations"][1].split("/")[1]}),
                   403)["code"] == "forbidden"
    query = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": recorded["resources"][0]}]}
    assert outcome(a.post("Patient/$match", query, own), 403)["code"] == "forbidden"
    assert outcome(a.get(recorded["locations"][1], own), 403)["code"] == "forbidden"
    consents = a.get("Consent", own, params={"patient.identifier": f"{EMPI}|{empi}"})
    assert consents.status_code == 200
    # A patient does not record: refused before the body is read.
    assert outcome(a.post("", b"{" * 1000, own), 403)["code"] == "forbidden"


def test_a_batch_records_the_good_entries_and_answers_each(members):
    c = members["C"]
    people = synthea_patient()
    patient = dict(json.loads((SYNTHEA / "Patient.ndjson").read_text().splitlines()[1]))
    bad = {"resourceType": "Observation", "id": "bad-one", "status": "final", "effectiveDateTime": "yesterday",
           "code": {"text": "x"}, "subject": {"reference": f"Patient/{patient['id']}"}}
    response = c.post("", transaction([patient, bad], kind="batch"))
    body = valid(response.json())
    assert response.status_code == 200 and body["type"] == "batch-response"
    first, second = (e["response"] for e in body["entry"])
    assert first["status"] == "201 Created" and first["location"].startswith("Patient/")
    assert second["status"] == "422 Unprocessable Entity"
    assert "Observation.effectiveDateTime" in second["outcome"]["issue"][0]["details"]["text"]
    # The same patient again: already recorded, not twice. A delete or a conditional create is not
    # carried out, and says so.
    request = transaction([patient], kind="batch")
    request["entry"] += [{"request": {"method": "DELETE", "url": first["location"]}},
                         {"resource": bad, "request": {"method": "POST", "url": "Observation",
                                                       "ifNoneExist": "identifier=x"}}]
    again = valid(c.post("", request).json())
    assert again["entry"][0]["response"] == {"status": "200 OK", "location": first["location"]}
    assert [e["response"]["status"] for e in again["entry"][1:]] == ["422 Unprocessable Entity"] * 2
    assert "conditional" in again["entry"][2]["response"]["outcome"]["issue"][0]["details"]["text"]
    del people


def test_bad_input_gets_an_operation_outcome_and_writes_nothing(members, tmp_path: Path):
    c = members["C"]
    before = trio.run(lambda: c.cluster.call("C", "vault.verify", decrypt=False))["entries"]
    patient = json.loads((SYNTHEA / "Patient.ndjson").read_text().splitlines()[2])
    bad = {"resourceType": "Condition", "id": "c1", "subject": {"reference": f"Patient/{patient['id']}"},
           "clinicalStatus": "active"}
    refused = outcome(c.post("", transaction([patient, bad])), 422)  # a transaction is all or nothing
    assert "Condition" in refused["details"]["text"]
    assert outcome(c.post("", b'{"resourceType": "Bundle", "type": "batch", "entry": [}'), 400)["code"] == "structure"
    assert outcome(c.post("", patient), 400)["code"] == "invalid"  # not a Bundle
    assert outcome(c.post("", {"resourceType": "Bundle", "type": "collection", "entry": []}), 422)["code"] == "invalid"
    huge = b'{"resourceType": "Bundle", "type": "batch", "entry": [' + b" " * (17 << 20) + b"]}"
    assert outcome(c.post("", huge), 413)["code"] == "too-costly"
    assert outcome(c.http.post(c.base, content=b"<Bundle/>", headers={
        "content-type": "application/fhir+xml", "authorization": f"Bearer {c.admin}"}), 415)["code"] == "not-supported"
    assert outcome(c.get("DocumentReference", params={"patient.identifier": f"{EMPI}|E{'C' * 24}", "_sort": "date"}),
                   400)["code"] == "not-supported"
    assert outcome(c.get("DocumentReference", params={"patient.identifier": "E" + "C" * 24}), 400)["code"] == "invalid"
    assert outcome(c.get("DocumentReference"), 400)["code"] == "required"
    not_a_date = {"resourceType": "Patient", "birthDate": "someday"}
    assert outcome(c.post("Patient/$match", {"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": not_a_date}]}), 422)["code"] == "invalid"
    assert outcome(c.post("Patient/$match", {"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": patient}, {"name": "fuzzy", "valueBoolean": True}]}), 400)["code"] == "invalid"
    assert outcome(c.post("Consent", {"resourceType": "Consent", "provision": {"type": "maybe"}}), 422)
    assert outcome(c.get("Flag/" + "0" * 32), 404)["code"] == "not-found"
    assert outcome(c.get("Organization/" + "0" * 32), 404)["code"] == "not-supported"
    assert outcome(c.get("no/such/path"), 404)["code"] == "not-found"
    assert outcome(c.http.delete(f"{c.base}/Consent", headers={"authorization": f"Bearer {c.admin}"}),
                   405)["code"] == "not-supported"
    after = trio.run(lambda: c.cluster.call("C", "vault.verify", decrypt=False))["entries"]
    assert after == before
    assert trio.run(lambda: c.cluster.status("C")) is not None  # and the node is still up
    assert "fhir.error" not in c.cluster.log("C")


def test_one_user_cannot_take_every_request_slot(members):
    """A client that opens requests and never sends their bodies holds at most its own share:
    its next request is refused (429), another user's is served, and nothing is left behind."""
    from urllib.parse import urlsplit

    from ehrnode.rest.app import MAX_IN_FLIGHT_PER_USER

    r = members["R"]
    auditor = r.user("aud-slots", "auditor")
    where = urlsplit(r.base)
    context = client_context(r.cluster.configs["R"].tls.ca)
    held = []
    try:
        for _ in range(MAX_IN_FLIGHT_PER_USER):
            raw = socket.create_connection((where.hostname, where.port), timeout=30)
            conn = context.wrap_socket(raw)
            conn.sendall(f"POST /fhir/Consent HTTP/1.1\r\nHost: {where.netloc}\r\nAuthorization: Bearer {r.admin}\r\n"
                         "Content-Type: application/fhir+json\r\nContent-Length: 100\r\n\r\n".encode())
            held.append(conn)
        # The held requests reach the node in their own time: ask until they all have.
        refused = _polled(lambda: r.get("Consent", params={"patient.identifier": f"{EMPI}|E{'D' * 24}"}), 429)
        assert outcome(refused, 429)["code"] == "throttled"
        assert refused.headers["retry-after"] == "1"
        assert r.get("Consent", auditor, params={"patient.identifier": f"{EMPI}|E{'D' * 24}"}).status_code == 200
    finally:
        for conn in held:
            conn.close()
    # Closed, the held requests give their slots back.
    after = _polled(lambda: r.get("Consent", params={"patient.identifier": f"{EMPI}|E{'D' * 24}"}), 200)
    assert after.status_code == 200, after.text
    assert "fhir.error" not in r.cluster.log("R")
    assert '"limit": "fhir_user_requests"' in r.cluster.log("R")


def _polled(ask, status: int, attempts: int = 150) -> httpx.Response:
    """``ask()`` again, a fifth of a second apart, until it answers ``status`` or the attempts run
    out; its last answer."""
    for _ in range(attempts):
        answer = ask()
        if answer.status_code == status:
            break
        time.sleep(0.2)
    return answer
