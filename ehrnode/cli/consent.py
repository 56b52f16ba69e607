"""Patients' consent on chain: ``consent grant|revoke|show``."""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from ..ledger.transactions import CONSENT_PURPOSES
from .common import Commands, UsageError, call_object, call_rows, iso, show, show_rows, with_config


def _until_ms(text: str | None) -> int:
    if not text:
        return 0

    try:
        day = datetime.date.fromisoformat(text)
    except ValueError as exc:
        raise UsageError(f"--until {text!r}: expected a date such as 2027-06-30") from exc
    # In force through the whole of that day (UTC).
    end = datetime.datetime.combine(day + datetime.timedelta(days=1), datetime.time(), datetime.UTC)
    return int(end.timestamp() * 1000)


def cmd_consent_change(args: argparse.Namespace) -> int:
    result = call_object(args, f"consent.{args.consent_command}", empi=args.empi, to=args.to,
                          purposes=args.purpose or ["*"], scope=args.scope.split(",") if args.scope else ["*"],
                          until=_until_ms(args.until))
    show(args, result, lambda r: [f"{args.consent_command} committed: {r['tx_id']} at height {r['height']}"])
    return 0


def cmd_consent_show(args: argparse.Namespace) -> int:
    def line(e: dict[str, Any]) -> str:
        until = iso(e["until"]) if e["until"] else "no end"
        return (f"height {e['height']:<8} {e['action']:<7} by {e['grantor']:<12} to {e['grantee']:<12} "
                f"purposes {','.join(e['purposes'])}  types {','.join(e['scope'])}  until {until}")

    show_rows(args, call_rows(args, "consent.show", empi=args.empi), line,
              none=f"no consent recorded for {args.empi}: the consortium's default applies")
    return 0


def register(commands: Commands) -> None:
    consent = commands.group("consent")
    for name, helptext in (("grant", "record that a patient allows access"),
                           ("revoke", "record that a patient refuses access")):
        change = with_config(consent.add_parser(name, help=helptext))
        change.add_argument("--empi", required=True)
        change.add_argument("--to", required=True, metavar="INSTITUTION", help="a member, or * for every member")
        change.add_argument("--purpose", action="append", choices=CONSENT_PURPOSES,
                            help="purpose of use (repeatable; default: all)")
        change.add_argument("--scope", metavar="TYPES", help="comma-separated resource types (default: all)")
        change.add_argument("--until", metavar="DATE", help="last day it is in force (default: no end)")
        change.add_argument("--json", action="store_true")
        change.set_defaults(func=cmd_consent_change)
    show_consent = with_config(consent.add_parser("show", help="every grant and revocation for a patient"))
    show_consent.add_argument("--empi", required=True)
    show_consent.add_argument("--json", action="store_true")
    show_consent.set_defaults(func=cmd_consent_show)
