"""The sharing commands: ``records pull|erase``, ``audit trail|trace-leak|disclosures`` and ``watch``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..crypto import write_secret_file
from ..errors import CryptoError, EhrnodeError
from ..ledger.transactions import CONSENT_PURPOSES
from .common import (
    Commands,
    UsageError,
    call_object,
    call_rows,
    iso,
    read_json_object,
    run_client,
    show,
    show_rows,
    with_config,
)


def cmd_records_pull(args: argparse.Namespace) -> int:
    pulled = call_object(args, "records.pull", record_id=args.record_id, purpose=args.purpose, timeout=args.timeout)
    if args.out:
        # The served copy, exactly what `audit trace-leak` takes: keep it like the PHI it may be.
        try:
            write_secret_file(Path(args.out), json.dumps(pulled, ensure_ascii=False, indent=2).encode())
        except CryptoError as exc:
            raise UsageError(f"--out: {exc}") from exc
    if args.json:
        print(json.dumps(pulled))
        return 0
    flag = "  EMERGENCY OVERRIDE" if pulled["emergency"] else ""
    print(f"record {pulled['record_id']} from {pulled['owner']} for {pulled['purpose']}: verified against its "
          f"anchor; access logged at height {pulled['height']} (tx {pulled['access_tx']}){flag}", file=sys.stderr)
    if not args.out:
        print(json.dumps(pulled["resource"], indent=2, ensure_ascii=False))
    return 0


def cmd_records_erase(args: argparse.Namespace) -> int:
    show(args, call_object(args, "records.erase", record_id=args.record_id, reason=args.reason), lambda r: [
        f"record {args.record_id} erased: data keys destroyed; record.erase {r['tx_id']} "
        + (f"committed at height {r['height']}" if r["height"] else "pending"),
    ])
    return 0


def _event_line(e: dict[str, Any]) -> str:
    when = iso(e["time"])
    who = e["who"] + (f"/{e['user']}" if e.get("user") else "")
    head = f"height {e['height']:<7} {when}  {e['event']:<15} {who:<12}"
    if e["event"] == "access":
        flag = " EMERGENCY" if e["reason"] == "emergency_override" else ""
        return (f"{head} {e['decision']:<8} {e['record_id']} ({e.get('resource_type') or '?'}) from {e['owner']} "
                f"for {e['purpose']}: {e['reason']}{flag}  tx {e['tx_id']}")
    if e["event"] == "consent":
        return (f"{head} {e['action']:<8} to {e['grantee']} purposes {','.join(e['purposes'])} "
                f"types {','.join(e['scope'])}  tx {e['tx_id']}")
    if e["event"] == "whois":
        return (f"{head} asked {e['institution']} who this user is, for case {e['case']!r}: "
                f"{e['reason'] or 'not answered yet'}  tx {e['tx_id']}")
    if e["event"] == "action":
        return f"{head} {e['kind']}  tx {e['tx_id']}"
    return f"{head} {e['record_id']} ({e.get('resource_type') or '?'})  tx {e['tx_id']}"


def cmd_audit_trail(args: argparse.Namespace) -> int:
    if sum(x is not None for x in (args.empi, args.record, args.subject)) != 1:
        raise UsageError("give one of --empi, --record or --user PSEUDONYM")
    params: dict[str, Any] = {"fhir": args.fhir}
    if args.empi:
        params["empi"] = args.empi
    elif args.record:
        params["record_id"] = args.record
    else:
        params["user"] = args.subject
    if args.fhir:  # a FHIR Bundle of AuditEvents
        print(json.dumps(call_object(args, "audit.trail", **params), indent=2))
        return 0
    show_rows(args, call_rows(args, "audit.trail", **params), _event_line)
    return 0


def cmd_audit_disclosures(args: argparse.Namespace) -> int:
    def line(r: dict[str, Any]) -> str:
        flag = "  EMERGENCY" if r["reason"] == "emergency_override" else ""
        kind = r.get("resource_type") or "?"
        return (f"{iso(r['time'])}  to {r['who']:<12} ({r['user_role']:<10}) by {r['owner']:<12} {kind:<20} "
                f"for {r['purpose']:<14} record {r['record_id']}  height {r['height']}{flag}")

    show_rows(args, call_rows(args, "audit.disclosures", empi=args.empi), line,
              none=f"no disclosures of {args.empi}'s records")
    return 0


def cmd_audit_trace(args: argparse.Namespace) -> int:
    leaked = read_json_object(args.file, "a served record")
    def lines(result: dict[str, Any]) -> Iterator[str]:
        yield (f"record {result['record_id']} ({result['resource_type']}) of {result['owner']}, "
               f"commitment {result['commitment']}: the copy is genuine")
        if not result["served"]:
            yield "never served to another member: the copy comes from its owner"
        for a in result["served"]:
            yield (f"  served to {a['who']:<12} user {a['user']} ({a['user_role']}) for {a['purpose']:<14} "
                   f"{iso(a['time'])}  height {a['height']}  tx {a['tx_id']}")

    show(args, call_object(args, "audit.trace", leaked=leaked), lines)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    async def follow(client: Any) -> None:
        await client.call("events.subscribe", empis=args.empi or [], own=args.own or not args.empi)
        async for note in client.notifications():
            if note.get("method") == "event":
                print(json.dumps(note["params"]), flush=True)
            elif note.get("method") == "event.ended":
                raise EhrnodeError("the node closed this feed: it fell too far behind (catch up with `audit trail`)",
                                   reason="too_far_behind")

    run_client(args, follow)
    return 0


def register(commands: Commands) -> None:
    records = commands.group("records")
    pull = with_config(records.add_parser(
        "pull", help="pull another institution's record, verified against its anchor",
        description="Ask the record's owner for its de-identified release. The owner checks policy and the "
        "patient's consent and commits the access to the chain before serving; the release is checked "
        "against the anchor's commitment before it is shown."))
    pull.add_argument("record_id")
    pull.add_argument("--purpose", required=True, choices=CONSENT_PURPOSES)
    pull.add_argument("--out", metavar="FILE", help="write the served copy (release, salt, access) here, mode 0600")
    pull.add_argument("--timeout", type=float, default=60.0)
    pull.add_argument("--json", action="store_true")
    pull.set_defaults(func=cmd_records_pull)
    erase = with_config(records.add_parser(
        "erase", help="erase one of this institution's records (destroys its data keys)",
        description="Crypto-shred a record: its data keys are destroyed, its vault entry and on-chain "
        "commitment stay, and record.erase is committed. The reason's text stays here; its digest goes on chain."))
    erase.add_argument("record_id")
    erase.add_argument("--reason", required=True)
    erase.add_argument("--json", action="store_true")
    erase.set_defaults(func=cmd_records_erase)

    audit_commands = commands.group("audit")
    trail = with_config(audit_commands.add_parser(
        "trail", help="every event of a patient, a record or a user",
        description="Every event of a patient (--empi), a record (--record) or a user (--user, by pseudonym), "
        "in chain order. Here --user names whom to audit; act as someone with --as."), user_flags=("--as",))
    trail.add_argument("--empi")
    trail.add_argument("--record", metavar="RECORD_ID")
    trail.add_argument("--user", dest="subject", metavar="[INSTITUTION/]PSEUDONYM",
                       help="a user, as trace-leak names them (B/U...); a bare pseudonym (U...) matches it "
                            "at any member")
    trail.add_argument("--json", action="store_true")
    trail.add_argument("--fhir", action="store_true", help="a FHIR Bundle of AuditEvent resources")
    trail.set_defaults(func=cmd_audit_trail)
    trace = with_config(audit_commands.add_parser(
        "trace-leak", help="given a leaked served copy, the record it is and everyone it was served to"))
    trace.add_argument("file", metavar="FILE")
    trace.add_argument("--json", action="store_true")
    trace.set_defaults(func=cmd_audit_trace)
    disclosures = with_config(audit_commands.add_parser(
        "disclosures", help="the accounting of disclosures for one patient"))
    disclosures.add_argument("--empi", required=True)
    disclosures.add_argument("--json", action="store_true")
    disclosures.set_defaults(func=cmd_audit_disclosures)

    watch = with_config(commands.add(
        "watch", help="print events as they are committed, as JSON lines",
        description="New records, accesses, consent changes, erasures and integrity alarms: for the EMPIs "
        "given, or (default) for this institution's own patients and records."))
    watch.add_argument("--empi", action="append", help="an EMPI to follow (repeatable)")
    watch.add_argument("--own", action="store_true", help="also this institution's own events (default without --empi)")
    watch.set_defaults(func=cmd_watch)
