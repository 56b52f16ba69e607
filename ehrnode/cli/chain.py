"""The chain as the node sees it: ``status``, ``block get``, ``tx submit``, ``keys status|rotate``, ``api methods``."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Iterator
from typing import Any

from .common import Commands, call_object, non_negative, show, with_config


def cmd_status(args: argparse.Namespace) -> int:
    show(args, call_object(args, "status"), lambda s: [
        f"node {s['node']}  height {s['height']}  round {s['round']}  mempool {s['mempool']}",
        f"head {s['head']}",
        f"peers {', '.join(s['peers']) or '(none)'}",
        f"fhir  {s.get('fhir') or '(off)'}",
    ])
    return 0


def cmd_block_get(args: argparse.Namespace) -> int:
    params = {} if args.height is None else {"height": args.height}
    show(args, call_object(args, "block.get", **params), lambda block: [
        f"height {block['height']}  round {block['round']}  author {block.get('author')}",
        f"id     {block['id']}",
        f"parent {block['parent']}",
        *(f"  {tx['id'][:16]}  {tx['kind']:<8} {tx.get('submitter', '')}  {json.dumps(tx.get('body', {}))}"
          for tx in block["txs"]),
    ])
    return 0


def cmd_tx_submit(args: argparse.Namespace) -> int:
    show(args, call_object(args, "tx.submit", note=args.note, wait=args.wait, timeout=args.timeout), lambda r: [
        f"submitted {r['tx_id']}" if r["height"] is None else f"committed {r['tx_id']} at height {r['height']}",
    ])
    return 0


def cmd_keys_status(args: argparse.Namespace) -> int:
    def lines(view: dict[str, Any]) -> Iterator[str]:
        yield f"current epoch {view['current']}  (rotated every {view['rotate_days']:g} days, in turn)"
        for e in view["epochs"]:
            opened = datetime.datetime.fromtimestamp(e["time"] / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
            held = "held" if e["held"] else "NOT HELD"
            yield f"  epoch {e['epoch']:<4} from height {e['starts']:<8} {opened}Z  by {e['opened_by']:<12} {held}"

    view = call_object(args, "keys.status")
    show(args, view, lines)
    if args.json:
        return 0  # the answer says what is unreadable; a script reads it there
    for epoch, why in view["unreadable"].items():
        print(f"  epoch {epoch}: {why}", file=sys.stderr)
    return 1 if view["unreadable"] else 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    show(args, call_object(args, "keys.rotate", timeout=args.timeout), lambda r: [
        f"epoch {r['epoch']} opened at height {r['height']}: blocks from height {r['starts']} are sealed under its key",
    ])
    return 0


def cmd_api_methods(args: argparse.Namespace) -> int:
    """Every method of the local API, from its method table."""
    from ..api.methods import TABLE, reference

    if args.markdown:
        print(reference())
        return 0
    width = max(len(m.name) for m in TABLE)
    flags = {m.name: "".join(f" [{f}]" for f in m.flags) for m in TABLE}
    show(args, [{"method": m.name, "summary": m.summary, "patient": m.patient, "always": m.always,
                 "institution": m.institution} for m in TABLE],
         lambda rows: [f"{r['method']:<{width}}  {r['summary']}{flags[r['method']]}" for r in rows])
    return 0


def register(commands: Commands) -> None:
    status = with_config(commands.add("status", help="height, head, round, peers and mempool of a node"))
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    api_group = commands.group("api")
    methods = api_group.add_parser("methods", help="every method of the local API: what it takes and answers")
    methods.add_argument("--json", action="store_true")
    methods.add_argument("--markdown", action="store_true", help="the API reference, as docs/api.md has it")
    methods.set_defaults(func=cmd_api_methods)

    keys = commands.group("keys")
    keys_status = with_config(keys.add_parser("status", help="the chain's epochs and which keys this member holds"))
    keys_status.add_argument("--json", action="store_true")
    keys_status.set_defaults(func=cmd_keys_status)
    rotate = with_config(keys.add_parser(
        "rotate", help="open a new epoch now: a fresh key sealed to every current member",
        description="Generate the next epoch key, seal it to every current member's X25519 key and commit it. "
        "Transactions submitted after the block it commits in are sealed under it; earlier epochs' keys stay "
        "with current members for reading history."))
    rotate.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the commit")
    rotate.add_argument("--json", action="store_true")
    rotate.set_defaults(func=cmd_keys_rotate)

    block = commands.group("block")
    get = with_config(block.add_parser("get", help="a committed block (default: the head)"))
    get.add_argument("--height", type=non_negative)
    get.add_argument("--json", action="store_true")
    get.set_defaults(func=cmd_block_get)

    tx = commands.group("tx")
    submit = with_config(tx.add_parser("submit", help="submit a signed note transaction"))
    submit.add_argument("--note", required=True, help="the note's text")
    submit.add_argument("--wait", action="store_true", help="wait until it is committed and print its height")
    submit.add_argument("--timeout", type=float, default=30.0, help="seconds to wait with --wait")
    submit.add_argument("--json", action="store_true")
    submit.set_defaults(func=cmd_tx_submit)
