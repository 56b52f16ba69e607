"""Recording throughput: FHIR in, anchors committed, on a four-member consortium on loopback.

Starts four `ehrnode run` processes from a fresh `consortium init`, then records the Synthea
patients shipped in `tests/data/synthea` at one institution through its local API, as
`ehrnode records add` does, and measures records per second from the first byte sent to the
last anchor committed (parse, validate, de-identify, encrypt, vault, sign, gossip, commit).
`--copies N` records the data N times under fresh resource ids, for a longer run. The clock
starts once the consortium's first OPRF key is ready (a few seconds after a fresh consortium
starts; recording waits for it, once), and that wait is reported apart. The same amount of new
data (fresh resource ids) is then recorded again: the first ingest after a start pays for what is
done once (the FHIR model classes each worker process loads on first use, and, if they had not
started with the node by then, the worker processes themselves; reported), the next does not.

It also measures the pieces alone, in this process: FHIR validation and de-identification.

With ``--hung``, member C (an OPRF key holder) is stopped (SIGSTOP: its sockets stay open, it
answers nothing) once the key is ready, and recording is measured after A has closed it out (or
after ``SILENT_TIMEOUT`` and 15 s more, when it does not): A then needs B's evaluations for every
OPRF batch.

    python benchmarks/ingest.py [--copies 1] [--hung] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ehrnode.client import ApiClient
from ehrnode.localnet import LocalConsortium
from ehrnode.net.peers import SILENT_TIMEOUT
from ehrnode.records import fhir
from ehrnode.records.deid import Deidentifier, load_profile
from ehrnode.records.submit import add_items

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import verify_rate  # the cluster benchmark's, beside this one

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "synthea"
#: The members that hold OPRF shares in the local consortium (the regulator holds none).
INSTITUTIONS = ("A", "B", "C")


def load_items(copies: int, first: int = 0) -> list[fhir.Item]:
    """The shipped patients ``copies`` times, copy ``first`` on; copy 0 as shipped, every other one
    under fresh resource ids (consistently in references), so each copy is new data."""
    intake = fhir.load(sorted(DATA.glob("*.ndjson")))
    if intake.problems:
        raise SystemExit(f"{len(intake.problems)} problems in {DATA}: {intake.problems[0]}")
    items: list[fhir.Item] = []
    text = json.dumps([i.resource for i in intake.items])
    ids = {i.resource["id"] for i in intake.items}
    for copy in range(first, first + copies):
        if copy == 0:
            items.extend(intake.items)
            continue
        mapped = text
        for old in ids:
            mapped = mapped.replace(old, str(uuid.uuid5(uuid.NAMESPACE_URL, f"{copy}/{old}")))
        items.extend(fhir.Item(f"copy{copy}:{i}", r) for i, r in enumerate(json.loads(mapped)))
    return items


def pieces(items: list[fhir.Item]) -> dict[str, float]:
    start = time.perf_counter()
    for item in items:
        fhir.validate(item)
    validate_s = time.perf_counter() - start
    deid = Deidentifier(load_profile(), bytes(32))
    patient_items = [i for i in items if fhir.is_patient_data(i.resource)]
    start = time.perf_counter()
    for item in patient_items:
        deid.deidentify(item.resource, patient=fhir.patient_id(item.resource) or "")
    deid_s = time.perf_counter() - start
    return {"validate_per_s": round(len(items) / validate_s), "deidentify_per_s": round(len(patient_items) / deid_s)}


async def ingest(client: ApiClient, items: list[fhir.Item]) -> dict[str, float]:
    start = time.perf_counter()
    marks: dict[str, float] = {}

    def progress(text: str) -> None:
        if text.startswith("recorded"):
            marks["recorded"] = time.perf_counter() - start

    result = await add_items(client, items, timeout=600, progress=progress)
    total = time.perf_counter() - start
    records = [r for r in result.records if r["tx_id"]]
    committed = sum(1 for r in records if result.heights.get(r["tx_id"]) is not None)
    return {
        "resources": len(items), "records": len(records), "committed": committed,
        "transactions": len({r["tx_id"] for r in records}),
        "seconds": round(total, 2), "records_per_s": round(committed / total, 1),
        "vault_write_seconds": round(marks.get("recorded", 0.0), 2),
    }


async def end_to_end(root: Path, first: list[fhir.Item], then: list[fhir.Item], hung: bool = False) -> dict[str, Any]:
    """``first`` recorded on a consortium just started, then ``then`` on the same one (with
    ``hung``, while member C is stopped)."""
    cluster = LocalConsortium(root)
    cluster.start_all()
    stopped = None
    try:
        await cluster.wait_ready()
        key_wait = await cluster.wait_oprf_key(list(INSTITUTIONS))
        closed_out = None
        if hung:
            stopped = cluster.procs["C"]
            stopped.send_signal(signal.SIGSTOP)
            start = time.perf_counter()
            with trio.move_on_after(SILENT_TIMEOUT + 15):
                while "C" in (await cluster.call("A", "status"))["peers"]:
                    await trio.sleep(0.5)
                closed_out = round(time.perf_counter() - start, 1)
        async with ApiClient.connect(cluster.configs["A"]) as client:
            workers_ready = "records.workers_started" in cluster.log_path("A").read_text()
            cold = await ingest(client, first)
            warm = await ingest(client, then)
        return {"first": cold, "next": warm, "oprf_key_seconds": round(key_wait, 2),
                "workers_started_before": workers_ready,
                **({"hung": "C", "closed_out_after_s": closed_out} if hung else {})}
    finally:
        if stopped is not None:
            stopped.send_signal(signal.SIGCONT)
        cluster.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--hung", action="store_true", help="record while member C is stopped (SIGSTOP)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    first, then = load_items(args.copies), load_items(args.copies, first=args.copies)
    figures: dict[str, Any] = {"pieces": pieces(first)}
    with tempfile.TemporaryDirectory(prefix="ehrnode-ingest-") as tmp:
        figures["end_to_end"] = trio.run(end_to_end, Path(tmp) / "consortium", first, then, args.hung)
    figures["verify_per_s"] = round(verify_rate())  # Ed25519, one core: how fast this machine was
    if args.json:
        print(json.dumps(figures))
        return
    p, e = figures["pieces"], figures["end_to_end"]
    print(f"machine: {os.cpu_count()} cores, Ed25519 verify {figures['verify_per_s']:,}/s per core")
    if args.hung:
        closed, waited = e["closed_out_after_s"], SILENT_TIMEOUT + 15
        print("member C stopped (SIGSTOP); " + (f"closed out by A after {closed} s" if closed is not None
                                                 else f"still listed as connected at A after {waited:g} s"))
    print(f"validation alone        {p['validate_per_s']:>8} resources/s")
    print(f"de-identification alone {p['deidentify_per_s']:>8} resources/s")
    for label, run in (("first ingest", e["first"]), ("next ingest", e["next"])):
        print(f"{label:<23} {run['records_per_s']:>8} records/s committed "
              f"({run['committed']}/{run['records']} records of {run['resources']} resources in {run['seconds']} s, "
              f"{run['transactions']} anchor transactions; vault written after {run['vault_write_seconds']} s)")
    print(f"(timed once the OPRF key, generated at the consortium's first start, was ready: "
          f"{e['oprf_key_seconds']} s after the members were; the recording member's worker processes "
          f"{'had started with it' if e['workers_started_before'] else 'started with the first ingest'})")


if __name__ == "__main__":
    main()
