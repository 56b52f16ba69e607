"""The master patient index: ``empi lookup|review|history|requests`` and its changes."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import (
    Commands,
    call_object,
    call_rows,
    read_json_object,
    show,
    show_rows,
    with_config,
)


def cmd_empi_lookup(args: argparse.Namespace) -> int:
    patient = read_json_object(args.patient, "a FHIR Patient")
    show(args, call_object(args, "empi.lookup", patient=patient), lambda result: [
        f"empi {result['empi'] or '(none: a new patient)'}  grade {result['grade'] or '-'}",
        *(f"  candidate {c['empi']}  {c['grade']:<9} score {c['evidence']['total']}" for c in result["candidates"]),
    ])
    return 0


def cmd_empi_review(args: argparse.Namespace) -> int:
    def line(item: dict[str, Any]) -> str:
        fields = ", ".join(f"{f['field']} {f['dice']}" for f in item["evidence"]["fields"] if f["dice"] is not None)
        return (f"{item['a']['enrolment']} ({item['a']['institution']}, {item['a']['empi']})  ~  "
                f"{item['b']['enrolment']} ({item['b']['institution']}, {item['b']['empi']})  score {item['score']}"
                f"  [{fields}]")

    show_rows(args, call_rows(args, "empi.review"), line, none="no potential duplicates")
    return 0


def cmd_empi_history(args: argparse.Namespace) -> int:
    show_rows(args, call_rows(args, "empi.history", empi=args.empi),
              lambda e: f"height {e['height']:<8} {e['event']:<14} {e['detail']}  tx {e['tx_id'][:16]}")
    return 0


def cmd_empi_change(args: argparse.Namespace) -> int:
    params = {
        "link": lambda: {"enrolment": args.enrolment, "empi": args.empi},
        "split": lambda: {"enrolment": args.enrolment},
        "not-duplicate": lambda: {"a": args.a, "b": args.b},
        "merge": lambda: {"from": args.source, "into": args.target},
        "unmerge": lambda: {"merge": args.merge},
        "accept": lambda: {"request": args.request},
    }[args.empi_command]()
    result = call_object(args, "empi." + args.empi_command.replace("-", "_"), **params)
    show(args, result, lambda r: [f"committed {r['tx_id']} at height {r['height']}"])
    if result.get("waiting") and not args.json:
        print(f"held until {', '.join(result['waiting'])} agree: each runs `ehrnode empi accept {result['tx_id']}`",
              file=sys.stderr)
    return 0


def cmd_empi_requests(args: argparse.Namespace) -> int:
    def line(r: dict[str, Any]) -> str:
        what = (f"link {r['enrolment']} -> {r['empi']}" if r["kind"] == "link"
                else f"merge {r['from']} -> {r['into']}")
        state = f"stale ({r['stale']})" if r["stale"] else f"waiting for {', '.join(r['waiting']) or '-'}"
        return f"{r['request']}  {r['requester']:<12} {what}  {state}"

    show_rows(args, call_rows(args, "empi.requests"), line, none="no held links or merges")
    return 0


def register(commands: Commands) -> None:
    empi = commands.group("empi")
    lookup = with_config(empi.add_parser("lookup", help="the EMPI a FHIR Patient would get, with its match grade"))
    lookup.add_argument("patient", metavar="PATIENT.json")
    lookup.add_argument("--json", action="store_true")
    lookup.set_defaults(func=cmd_empi_lookup)
    review = with_config(empi.add_parser("review", help="potential duplicates, with field-level evidence"))
    review.add_argument("--json", action="store_true")
    review.set_defaults(func=cmd_empi_review)
    history = with_config(empi.add_parser("history", help="every change to one EMPI"))
    history.add_argument("empi")
    history.add_argument("--json", action="store_true")
    history.set_defaults(func=cmd_empi_history)
    requests = with_config(empi.add_parser(
        "requests", help="held links and merges: made by this institution, or waiting for its agreement"))
    requests.add_argument("--json", action="store_true")
    requests.set_defaults(func=cmd_empi_requests)
    for name, helptext, positional in (
        ("link", "link an enrolment to an EMPI", (("enrolment", "ENROLMENT"), ("empi", "EMPI"))),
        ("split", "move an enrolment wrongly linked (twins, say) to a new EMPI of its own",
         (("enrolment", "ENROLMENT"),)),
        ("not-duplicate", "close a potential duplicate: the two enrolments are different people",
         (("a", "ENROLMENT"), ("b", "ENROLMENT"))),
        ("merge", "merge one EMPI into another", (("source", "FROM"), ("target", "INTO"))),
        ("unmerge", "undo a merge, given the merge's transaction id", (("merge", "MERGE_TX"),)),
        ("accept", "agree to another institution's held link or merge of patients this one holds",
         (("request", "REQUEST_TX"),)),
    ):
        change = with_config(empi.add_parser(name, help=helptext))
        for dest, metavar in positional:
            change.add_argument(dest, metavar=metavar)
        change.add_argument("--json", action="store_true")
        change.set_defaults(func=cmd_empi_change)
