"""`ehrnode demo`: a whole local consortium, end to end, in one command.

Three hospitals and a regulator, each a real `ehrnode run` process on loopback with
its own keys, stores and local API. The demo generates synthetic patients (offline,
seeded), records them at one hospital (validated, de-identified, encrypted into its
vault, anchored on chain), registers the same people at a second hospital under its
own record numbers and shows that both get the same EMPI, scans every node's chain
for the patients' identifying data (none), has a clinician at a third hospital pull a record (access
logged on chain first under the clinician's pseudonym, copy verified against its anchor) and
again over the FHIR REST interface, shows the audit trail and resolves the pseudonym at the
clinician's hospital, withdraws the patient's consent (refused, logged) and shows an emergency override,
kills a node and shows it catching up after a restart while the others keep recording,
admits a fourth hospital by a vote of the members (it syncs and verifies the chain from
genesis and reads records anchored before it joined), and stops every member cleanly. It prints progress
as it goes and ends with a summary table; a step that fails says why and the demo
exits non-zero.
"""

from __future__ import annotations

import http.client
import json
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import trio

from . import synthetic
from .client import ApiClient, ApiError
from .config import NodeConfig
from .errors import EhrnodeError
from .localnet import LocalConsortium
from .net.tls import client_context
from .records.submit import add_items, read_inputs

MEMBERS = ["HospitalA", "HospitalB", "HospitalC", "Regulator"]
HOSPITALS = MEMBERS[:3]
JOINING = "HospitalD"


@dataclass
class Step:
    name: str
    result: str
    seconds: float
    ok: bool = True


class DemoFailed(EhrnodeError):
    reason = "demo"


class Demo:
    def __init__(self, root: Path, out: Callable[[str], None] = print, patients: int = 12) -> None:
        self.root = root
        self.out = out
        self.patients = patients
        self.steps: list[Step] = []
        self.net: LocalConsortium | None = None

    def _step(self, name: str, started: float, result: str) -> None:
        self.steps.append(Step(name, result, time.monotonic() - started))
        self.out(f"   ok: {result}")

    async def _record(self, name: str, population: list[synthetic.Person], *, visits: int) -> list[dict[str, Any]]:
        """Write ``population`` as one NDJSON file and record it at ``name``; the committed rows."""
        assert self.net is not None
        inputs = self.root / "inputs"
        inputs.mkdir(exist_ok=True)
        path = inputs / f"{name}-{len(list(inputs.iterdir()))}.ndjson"
        resources = [r for p in population for r in synthetic.patient_resources(p, name, visits=visits, seed=7)]
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in resources), encoding="utf-8")
        items = read_inputs([path], skip_invalid=False).items
        async with ApiClient.connect(self.net.configs[name]) as client:
            result = await add_items(client, items, timeout=60)
        rows = [dict(r, height=result.heights.get(r["tx_id"])) for r in result.records]
        missing = [r for r in rows if r["height"] is None]
        if missing:
            raise DemoFailed(f"{len(missing)} of {len(rows)} anchors from {name} not committed within 60 s")
        return rows

    async def _same_chain(self, names: list[str], height: int) -> str:
        assert self.net is not None
        heads = {}
        for name in names:
            heads[name] = (await self.net.call(name, "block.get", height=height, ids=True))["id"]
        if len(set(heads.values())) != 1:
            raise DemoFailed(f"members disagree on block {height}: {heads}")
        return next(iter(heads.values()))

    async def run(self) -> None:
        started = time.monotonic()
        self.out(f"1. Founding a consortium of {', '.join(HOSPITALS)} and the Regulator in {self.root}: each member "
                 "makes its own keys (keys init), the founder builds the genesis from their public halves "
                 "(consortium init --members) and the consortium CA signs each member's TLS certificate")
        self.net = net = LocalConsortium(self.root, MEMBERS, founded=True)
        self._step("consortium init", started,
                   f"chain {net.genesis.chain_id}, {len(MEMBERS)} members each holding only its own private keys, "
                   f"TLS 1.3 between them, genesis {net.genesis.hash.hex()[:16]}")

        started = time.monotonic()
        self.out("2. Starting one node process per member")
        net.start_all()
        await net.wait_ready(timeout=60)
        ports = ", ".join(f"{n} {net.configs[n].peer_listen.port}" for n in MEMBERS)
        self._step("4 nodes up", started, f"all connected to each other (peer ports: {ports})")

        started = time.monotonic()
        population = synthetic.people(self.patients, seed=7)
        first, later = population[: self.patients * 2 // 3], population[self.patients * 2 // 3:]
        self.out(f"3. HospitalA records {len(first)} synthetic patients (FHIR NDJSON): de-identified, encrypted "
                 "into its vault, anchored on chain")
        rows = await self._record("HospitalA", first, visits=2)
        empis = {row["empi"] for row in rows}
        height = max(row["height"] for row in rows)
        await net.wait_height(MEMBERS, height)
        head = await self._same_chain(MEMBERS, height)
        self._step("record", started, f"{len(rows)} records of {len(empis)} patients anchored, committed by all "
                                      f"four by height {height}, same block {head[:16]} everywhere")

        started = time.monotonic()
        self.out("4. HospitalB registers the same people under its own record numbers; the Regulator lists "
                 "one patient's records by EMPI")
        rows_b = await self._record("HospitalB", first, visits=1)
        shared = empis & {row["empi"] for row in rows_b}
        if shared != empis:
            raise DemoFailed(f"only {len(shared)} of {len(empis)} patients got the same EMPI at both hospitals")
        await net.wait_height(["Regulator"], max(row["height"] for row in rows_b))
        example = sorted(shared)[0]
        listing = await net.call("Regulator", "records.list", empi=example)
        for anchor in listing:
            self.out(f"      {anchor['institution']:<10} {anchor['resource_type']:<12} {anchor['setting']:<6} "
                     f"record {anchor['record_id'][:12]}  height {anchor['height']}")
        by = sorted({a["institution"] for a in listing})
        self._step("empi", started, f"all {len(shared)} patients share one EMPI across both hospitals; "
                                    f"{example}: {len(listing)} records at {' and '.join(by)}")

        started = time.monotonic()
        self.out("5. Nothing identifying on chain: every node's block store and ledger are scanned for every "
                 "patient's name, national id, phone, birth date and street, and the block stores (sealed under "
                 "epoch keys) for every EMPI and record id too; HospitalA's vault is verified")
        needles = {v for p in population for v in (p.family + p.given, p.given, p.family, p.national_id, p.phone,
                                                    p.birth_date, p.line) if len(v) >= 2 and len(v.encode()) >= 4}
        for name in MEMBERS:
            for path in sorted(net.configs[name].data_dir.glob("*.sqlite3*")):
                if path.name.startswith("vault"):
                    continue
                blob = path.read_bytes()
                found = [n for n in needles if n.encode() in blob]
                if path.name.startswith("blocks"):
                    # The ledger state indexes EMPIs and record ids; the blocks hold them only sealed.
                    found += [e for e in empis if e.encode() in blob]
                    found += [r["record_id"] for r in rows + rows_b if bytes.fromhex(r["record_id"]) in blob]
                if found:
                    raise DemoFailed(f"{name}/{path.name} holds patient data: {found[:3]}")
        report = await net.call("HospitalA", "vault.verify")
        if not report["ok"]:
            raise DemoFailed(f"HospitalA's vault does not verify: {report['problems'][:3]}")
        self._step("privacy", started, f"{len(needles)} identifying values, found in no block store or ledger; "
                                       f"{len(empis)} EMPIs and {len(rows) + len(rows_b)} record ids, in no block "
                                       f"store; vault of "
                                       f"{report['entries']} entries verifies against {report['anchored']} anchors")

        started = time.monotonic()
        record = next(a for a in listing if a["institution"] == "HospitalA" and a["resource_type"] != "Patient")
        self.out(f"6. Dr Chen, a clinician at HospitalC, pulls HospitalA's {record['resource_type']} record of "
                 f"{example} for treatment: HospitalA logs the access on chain before serving, HospitalC checks "
                 "the copy against its anchor")
        chen = await net.call("HospitalC", "users.add", name="dr.chen", role="clinician")
        async with ApiClient.connect(net.configs["HospitalC"], user="dr.chen", credential=chen["credential"]) as c:
            pulled = await c.call("records.pull", record_id=record["record_id"], purpose="treatment")
        self.out("   Dr Chen's EHR pulls it again over HospitalC's FHIR R4 REST interface (docs/fhir.md):")
        base = (await net.call("HospitalC", "status"))["fhir"]
        url = f"{base}/{record['resource_type']}/{record['record_id']}"
        self.out(f"      GET {url}")
        self.out("      Authorization: Bearer <dr.chen's credential>   X-Purpose-Of-Use: TREAT")
        code, headers, body = await trio.to_thread.run_sync(_fhir_get, url, chen["credential"],
                                                            net.configs["HospitalC"])
        for line in [f"HTTP/1.1 {code} {HTTPStatus(code).phrase}", *headers, body[:100] + ("..." if len(body) > 100
                                                                                          else "")]:
            self.out(f"      {line}")
        if code != 200 or json.loads(body)["resourceType"] != record["resource_type"]:
            raise DemoFailed(f"the FHIR pull was not served: {code} {body[:300]}")
        trail = await net.call("Regulator", "audit.trail", record_id=record["record_id"])
        for event in trail:
            who = event["who"] + (f"/{event['user']}" if event.get("user") else "")
            self.out(f"      height {event['height']:<5} {event['event']:<9} by {who:<36} "
                     + (f"{event['decision']} for {event['purpose']}" if event["event"] == "access" else
                        event.get("resource_type") or ""))
        whois = await net.call("HospitalC", "audit.whois", pseudonym=chen["pseudonym"])
        if whois["name"] != "dr.chen" or not any(e.get("user") == chen["pseudonym"] for e in trail):
            raise DemoFailed(f"the trail does not lead to dr.chen: {trail}")
        self.out(f"      only HospitalC can say who {chen['pseudonym']} is: {whois['name']} ({whois['role']})")
        self._step("pull", started, f"{len(json.dumps(pulled['resource']))} bytes of de-identified "
                                    f"{record['resource_type']} verified; access logged at height "
                                    f"{pulled['height']} under dr.chen's pseudonym, resolved only at HospitalC; "
                                    "pulled over FHIR REST too")

        started = time.monotonic()
        self.out("7. The patient withdraws consent for HospitalC (recorded by HospitalB); HospitalC is refused, "
                 "and the refusal is on chain too; an emergency pull still gets through, flagged")
        await net.call("HospitalB", "consent.revoke", empi=example, to="HospitalC", purposes=["treatment"],
                       scope=["*"], until=0)
        try:
            await net.call("HospitalC", "records.pull", record_id=record["record_id"], purpose="treatment")
        except ApiError as exc:
            if exc.reason != "consent":
                raise
        else:
            raise DemoFailed("HospitalC was served a record after the patient withdrew consent")
        emergency = await net.call("HospitalC", "records.pull", record_id=record["record_id"], purpose="emergency")
        trail = await net.call("Regulator", "audit.trail", record_id=record["record_id"])
        decisions = [(e["decision"], e["reason"]) for e in trail if e["event"] == "access"]
        if ("refused", "consent") not in decisions or not emergency["emergency"]:
            raise DemoFailed(f"the audit trail does not show the refusal and the override: {decisions}")
        self._step("consent", started, "treatment pull refused (consent) and logged; emergency pull served and "
                                       "flagged emergency_override")

        started = time.monotonic()
        self.out("8. HospitalC crashes (SIGKILL); A and B keep recording")
        net.kill9("HospitalC")
        before = await net.height("HospitalA")
        more = await self._record("HospitalA", later[: len(later) // 2 + 1], visits=1)
        more += await self._record("HospitalB", later[len(later) // 2 + 1:], visits=1)
        reached = max(row["height"] for row in more)
        self._step("crash", started, f"HospitalC down; {len(more)} more records committed by A, B and the "
                                     f"Regulator (height {before} -> {reached})")

        started = time.monotonic()
        self.out("9. HospitalC restarts and catches up by itself")
        net.start("HospitalC")
        target = await net.height("HospitalA")
        await net.wait_height(["HospitalC"], target, timeout=60)
        head = await self._same_chain(MEMBERS, target)
        mine = await net.call("HospitalC", "records.list", empi=more[0]["empi"])
        if not any(a["record_id"] == more[0]["record_id"] for a in mine):
            raise DemoFailed("HospitalC caught up but does not list a record anchored while it was down")
        self._step("recovery", started, f"HospitalC back at height >= {target}, same block {head[:16]} as the "
                                        "others, and lists the records anchored while it was down")

        started = time.monotonic()
        self.out("10. HospitalD joins by a vote of the members, and reads the chain from genesis")
        config = net.new_member(JOINING)
        net.start(JOINING)
        member = json.loads((config.path.parent / "member.json").read_text(encoding="utf-8"))
        proposal = (await net.call("HospitalA", "consortium.propose", change="add", reason="joins the network",
                                   **member))["proposal"]
        for voter in ("HospitalB", "Regulator"):
            proposal = (await net.call(voter, "consortium.vote", proposal=proposal["id"]))["proposal"]
        if proposal["status"] != "adopted":
            raise DemoFailed(f"the proposal to add {JOINING} was not adopted: {proposal['status']}")
        target = await net.height("HospitalA")
        with trio.fail_after(60):
            while True:
                status = await net.status(JOINING)
                if status and status["validator"] and status["ledger"]["applied"] >= target:
                    break
                await trio.sleep(0.2)
        history = await net.call(JOINING, "records.list", empi=rows[0]["empi"])
        if not any(a["record_id"] == rows[0]["record_id"] for a in history):
            raise DemoFailed(f"{JOINING} joined but cannot read a record anchored before it joined")
        keys = await net.call(JOINING, "keys.status")
        self._step("join", started, f"{JOINING} admitted at height {proposal['decided']} by 3 of 4 votes; it verified "
                                    f"{target} blocks from genesis with the {len(keys['epochs'])} epoch keys sealed "
                                    "to it, lists records anchored before it joined, and votes")

        started = time.monotonic()
        self.out("11. Stopping every node (SIGTERM)")
        codes = net.stop_all()
        if any(codes.values()):
            raise DemoFailed(f"a node did not stop cleanly: exit codes {codes}")
        self._step("shutdown", started, f"all {len(codes)} closed their peers and stores and exited 0")

    def summary(self) -> str:
        width = max(len(s.name) for s in self.steps) if self.steps else 10
        lines = [f"{'step':<{width}}  {'seconds':>7}  result", f"{'-' * width}  {'-' * 7}  {'-' * 40}"]
        for s in self.steps:
            lines.append(f"{s.name:<{width}}  {s.seconds:>7.1f}  {s.result}")
        return "\n".join(lines)


def _fhir_get(url: str, credential: str, config: NodeConfig) -> tuple[int, list[str], str]:
    """GET ``url`` as a FHIR client would (TLS checked against the consortium CA): the status,
    the headers worth showing, and the body."""
    parts = urllib.parse.urlsplit(url)
    context = client_context(config.tls.ca) if config.tls is not None else None
    connection = (http.client.HTTPSConnection(parts.netloc, context=context, timeout=60) if parts.scheme == "https"
                  else http.client.HTTPConnection(parts.netloc, timeout=60))
    try:
        connection.request("GET", parts.path, headers={"Authorization": f"Bearer {credential}",
                                                       "X-Purpose-Of-Use": "TREAT",
                                                       "Accept": "application/fhir+json"})
        response = connection.getresponse()
        head = [f"{k}: {v}" for k, v in response.getheaders() if k.lower() in ("content-type", "x-access-log")]
        return response.status, head, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def run_demo(directory: Path | None, out: Callable[[str], None] = print) -> int:
    """Run the demo in ``directory`` (kept) or a temporary one (removed); returns an exit code."""
    with tempfile.TemporaryDirectory(prefix="ehrnode-demo-") as tmp:
        root = Path(directory) if directory is not None else Path(tmp)
        if directory is not None and any((root / p).exists() for p in ("genesis.toml", "founding/genesis.toml")):
            raise DemoFailed(f"{root} already holds a consortium; pass an empty --dir")
        demo = Demo(root / "consortium" if directory is None else root, out)
        began = time.monotonic()
        try:
            trio.run(demo.run)
        except EhrnodeError as exc:
            out(f"   FAILED: {exc}")
            if demo.net is not None:
                out(f"   node logs: {demo.root}/<member>.log")
            out("")
            out(demo.summary())
            return 1
        finally:
            if demo.net is not None:
                demo.net.stop_all()
        out("")
        out(demo.summary())
        out(f"\ndemo finished in {time.monotonic() - began:.1f} s" +
            (f"; files kept in {root}" if directory is not None else ""))
        return 0
