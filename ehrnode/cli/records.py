"""Recording and checking records: ``records add|list|show|kanon-report``, ``vault verify``, ``deid check``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .common import (
    Commands,
    UsageError,
    call_object,
    call_rows,
    config_path,
    iso,
    run_client,
    show,
    show_rows,
    with_config,
)


def cmd_records_add(args: argparse.Namespace) -> int:
    from ..records.submit import add_items, read_inputs

    inputs = read_inputs(args.files, skip_invalid=args.skip_invalid)
    items, problems = inputs.items, inputs.problems
    for path in inputs.empty:
        print(f"empty: {path}: no resources in it (nothing to record)", file=sys.stderr)
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)
    if not items:
        raise UsageError("no resources to record")

    def progress(text: str) -> None:
        if not args.json:
            print(f"... {text}", file=sys.stderr)

    result = run_client(args, lambda client: add_items(
        client, items, skip_invalid=args.skip_invalid, wait=not args.no_wait, timeout=args.timeout,
        progress=progress))
    rows = [{"record_id": r["record_id"], "empi": r["empi"], "tx_id": r["tx_id"],
             "height": result.heights.get(r["tx_id"]) if r["tx_id"] else None,
             "resource_type": r["resource_type"], "source": r["source"], "status": r["status"],
             "patient": r["patient"]}
            for r in result.records]
    for skip in result.skipped:
        print(f"skipped: {skip['source']} {skip['resource_type']}/{skip['id']}: {skip['reason']}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            where = "pending" if row["height"] is None else f"height {row['height']}"
            print(f"{row['record_id']}  {row['empi']}  {row['resource_type']:<20} {row['status']:<16} "
                  f"{where:<14} {row['source']}")
        new = sum(r["status"] == "recorded" for r in rows)
        print(f"{new} recorded, {len(rows) - new} already recorded, {len(result.skipped) + len(problems)} skipped",
              file=sys.stderr)
    undecided = {r["patient"] for r in rows if r["empi"] is None and r["height"] is not None}
    if undecided:
        print(f"ehrnode: {len(undecided)} patient(s) have no EMPI yet: their enrolment is not committed "
              "(`ehrnode records list` finds their records once it is)", file=sys.stderr)
    uncommitted = [r for r in rows if r["tx_id"] and r["height"] is None]
    if uncommitted and not args.no_wait:
        print(f"ehrnode: {len(uncommitted)} anchors not committed within {args.timeout} s "
              "(they stay queued and are offered again)", file=sys.stderr)
        return 1
    return 0


def cmd_records_list(args: argparse.Namespace) -> int:
    fields = ("record_id", "empi", "institution", "recorded_at", "resource_type", "commitment", "height", "setting",
              "tx_id")
    rows = [{k: r[k] for k in fields} for r in call_rows(args, "records.list", empi=args.empi)]
    show_rows(args, rows, lambda r: f"{r['record_id']}  {r['institution']:<12} {r['resource_type']:<20} "
                                    f"{r['setting']:<8} height {r['height']:<8} {iso(r['recorded_at'])}",
              none=f"no records anchored for {args.empi}")
    return 0


def cmd_records_show(args: argparse.Namespace) -> int:
    def lines(record: dict[str, Any]) -> list[str]:
        anchor = record["anchor"]
        return [f"record {record['record_id']}  {record['resource_type']}  empi {record['empi']}  "
                f"vault position {record['position']}",
                f"anchor height {anchor['height']} tx {anchor['tx_id']}" if anchor else "anchor not yet committed",
                json.dumps(record["deidentified" if args.deidentified else "resource"], indent=2, ensure_ascii=False)]

    show(args, call_object(args, "records.show", record_id=args.record_id), lines)
    return 0


def cmd_records_kanon(args: argparse.Namespace) -> int:
    show(args, call_object(args, "records.kanon"), lambda report: [f"{k:<14} {v}" for k, v in report.items()])
    return 0


def cmd_vault_verify(args: argparse.Namespace) -> int:
    def lines(report: dict[str, Any]) -> Iterator[str]:
        state = "OK" if report["ok"] else f"{len(report['problems'])} PROBLEM(S)"
        yield (f"vault {state}: {report['entries']} entries, {report['anchored']} anchored on chain, "
               f"{report['erased']} erased, head {report['head'][:16]}")
        for p in report["problems"]:
            yield f"  position {p['position']} record {p['record_id']}: {p['problem']}"

    report = call_object(args, "vault.verify", decrypt=not args.no_decrypt)
    show(args, report, lines)
    return 0 if report["ok"] else 1


def cmd_deid_check(args: argparse.Namespace) -> int:
    """What a profile would release from FILE..., and what it removed or changed (nothing recorded)."""
    from ..records import fhir
    from ..records.deid import Deidentifier, load_profile
    from ..records.deid.check import check, summary
    from ..records.submit import read_inputs

    profile_name: Path | str | None = args.profile
    key = os.urandom(32)
    if args.config or os.environ.get("EHRNODE_CONFIG"):
        from ..config import load_node_config
        from ..records.keys import _derive, load_secret

        config = load_node_config(config_path(args))
        if profile_name is None:
            profile_name = config.deid_profile_path
        if config.master_key_path is not None:
            # The institution's own key: pseudonyms and date shifts as its releases have them.
            key = _derive(load_secret(config.master_key_path, "master key"), "deid")
    deid = Deidentifier(load_profile(profile_name), key)
    inputs = read_inputs(args.files, skip_invalid=True)
    items = [item for item in inputs.items if fhir.validate(item) is None]
    invalid = len(inputs.items) - len(items) + len(inputs.problems)
    results = check(items, deid, level=args.level)
    totals = summary(results)
    totals["invalid_input"] = invalid
    totals["profile"] = deid.profile.name
    if args.json:
        print(json.dumps({"summary": totals, "resources": [r.view(with_release=not args.summary) for r in results]},
                         ensure_ascii=False))
        return 0
    if not args.summary:
        for r in results:
            print(f"== {r.source} {r.resource_type}/{r.resource_id}")
            if r.error:
                print(f"   not releasable: {r.error}")
                continue
            print(json.dumps(r.released, ensure_ascii=False))
            for what, paths in (("removed", r.removed), ("changed", r.changed), ("added", r.added)):
                if paths:
                    print(f"   {what}: {', '.join(paths)}")
            if r.found:
                print(f"   found in text: {', '.join(f'{k} {n}' for k, n in r.found.most_common())}")
    print(f"profile {totals['profile']}: {totals['resources']} resources, {totals['unreleasable']} not releasable, "
          f"{invalid} invalid input")
    for what in ("removed", "changed", "added"):
        if totals[what]:
            print(f"{what}:")
            for path, count in totals[what].items():
                print(f"  {count:>7}  {path}")
    if totals["found_in_text"]:
        print("found in free text: " + ", ".join(f"{k} {n}" for k, n in totals["found_in_text"].items()))
    return 0


def register(commands: Commands) -> None:
    records = commands.group("records")
    add = with_config(records.add_parser(
        "add", help="record FHIR resources (JSON, Bundle or NDJSON) at this institution",
        description="Validate, de-identify, encrypt into the vault and anchor on chain every resource of the "
        "files given (a folder stands for its .json, .ndjson and .jsonl files, as a FHIR bulk export). "
        "Invalid input records nothing unless --skip-invalid; an empty NDJSON file is reported, not refused."))
    add.add_argument("files", nargs="+", type=Path, metavar="FILE|DIR")
    add.add_argument("--skip-invalid", action="store_true", help="record the valid resources, report the others")
    add.add_argument("--no-wait", action="store_true", help="return once the anchors are in the mempool")
    add.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the anchors to commit")
    add.add_argument("--json", action="store_true")
    add.set_defaults(func=cmd_records_add)
    lst = with_config(records.add_parser("list", help="every anchored record of a patient, consortium-wide"))
    lst.add_argument("--empi", required=True)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_records_list)
    show = with_config(records.add_parser("show", help="one of this institution's records (local only)"))
    show.add_argument("record_id")
    show.add_argument("--deidentified", action="store_true", help="show the released (de-identified) form")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_records_show)
    kanon = with_config(records.add_parser("kanon-report", help="the k-anonymity the released patients reach"))
    kanon.add_argument("--json", action="store_true")
    kanon.set_defaults(func=cmd_records_kanon)

    vault = commands.group("vault")
    verify = with_config(vault.add_parser(
        "verify", help="check every vault entry's hash link, signature, ciphertexts and on-chain anchor"))
    verify.add_argument("--no-decrypt", action="store_true", help="skip decrypting each entry (faster)")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=cmd_vault_verify)

    deid = commands.group("deid")
    deid_check = deid.add_parser(
        "check", help="what a profile would release from FHIR files, and every element it removed or changed",
        description="De-identify FILE... as recording would (nothing is recorded) and print each resource as it "
        "would be released, with every element removed, changed or added and what was found in free text, then "
        "counts by element. --profile names a packaged profile (default, notes) or a file; with --config, the "
        "node's profile and its own key (pseudonyms and date shifts as its releases have them), else a random "
        "key.")
    deid_check.add_argument("files", nargs="+", type=Path, metavar="FILE|DIR")
    deid_check.add_argument("--profile", help="a packaged profile's name, or a profile file")
    deid_check.add_argument("--config", help="node.toml: use that node's profile and de-identification key")
    deid_check.add_argument("--level", type=int, default=0, choices=range(5),
                            help="k-anonymity level for Patients (0: the profile's own form; 4: suppressed)")
    deid_check.add_argument("--summary", action="store_true", help="only the counts, not each resource")
    deid_check.add_argument("--json", action="store_true")
    deid_check.set_defaults(func=cmd_deid_check)
