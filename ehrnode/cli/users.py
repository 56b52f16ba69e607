"""The user commands: ``users add|list|revoke|rotate|whoami`` and ``audit whois``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..crypto import write_secret_file
from ..errors import CryptoError
from .common import Commands, UsageError, call_object, call_rows, iso, show, show_rows, with_config


def _hand_over(args: argparse.Namespace, result: dict[str, Any], verb: str) -> None:
    """Give the new credential to whoever runs the command: into --out (0600), or printed once."""
    credential = result.pop("credential")
    if args.out:
        try:
            write_secret_file(Path(args.out), (credential + "\n").encode())
        except CryptoError as exc:
            raise UsageError(f"--out: {exc} (the credential was {verb} but not saved: rotate it)") from exc
    if args.json:
        print(json.dumps(result if args.out else {**result, "credential": credential}))
        return
    print(f"user {result['name']} ({result['role']}) {verb}; pseudonym on chain {result['pseudonym']}",
          file=sys.stderr)
    if args.out:
        print(f"credential written to {args.out} (mode 0600); it is not stored anywhere else", file=sys.stderr)
    else:
        print("credential (shown once; the node keeps only its hash):", file=sys.stderr)
        print(credential)


def cmd_users_add(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"name": args.name, "role": args.role}
    if args.empi:
        params["empi"] = args.empi
    result = call_object(args, "users.add", **params)
    _hand_over(args, result, "added")
    return 0


def cmd_users_rotate(args: argparse.Namespace) -> int:
    result = call_object(args, "users.rotate", name=args.name)
    _hand_over(args, result, "given a new credential (the old one no longer works)")
    return 0


def cmd_users_revoke(args: argparse.Namespace) -> int:
    show(args, call_object(args, "users.revoke", name=args.name),
         lambda _: [f"user {args.name} revoked: refused from now on"])
    return 0


def cmd_users_list(args: argparse.Namespace) -> int:
    def line(u: dict[str, Any]) -> str:
        state = "active" if u["active"] else f"revoked {iso(u['revoked'])}"
        bound = f"  patient {u['empi']}" if u.get("empi") else ""
        return f"{u['name']:<24} {u['role']:<11} {u['pseudonym']}  {state}{bound}"

    show_rows(args, call_rows(args, "users.list"), line)
    return 0


def cmd_users_whoami(args: argparse.Namespace) -> int:
    show(args, call_object(args, "users.whoami"), lambda me: [
        f"{me['name']} ({me['role']}), pseudonym {me['pseudonym']}; may: {', '.join(me['permissions'])}",
    ])
    return 0


def cmd_audit_whois(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"pseudonym": args.pseudonym}
    if args.at:
        if not args.case:
            raise UsageError("--at asks another institution on chain: give --case (what it is for)")
        params.update(at=args.at, case=args.case, timeout=args.timeout)
    def lines(found: dict[str, Any]) -> list[str]:
        if "request_tx" in found:
            return [f"{args.pseudonym} is {found['name']} ({found['role']}{'' if found['active'] else ', revoked'}) "
                    f"at {found['institution']}; asked for case {found['case']!r}: request {found['request_tx']}, "
                    f"answer {found['answer_tx']} (both on chain)"]
        state = "active" if found["active"] else f"revoked {iso(found['revoked'])}"
        return [f"{args.pseudonym} is {found['name']} ({found['role']}), added {iso(found['created'])} by "
                f"{found['created_by']}, {state}"]

    show(args, call_object(args, "audit.whois", **params), lines)
    return 0


def register(commands: Commands) -> None:
    audit_commands = commands.group("audit")
    users = commands.group("users")
    add = with_config(users.add_parser(
        "add", help="add a user with a role; prints (or writes) their credential once",
        description="Add a user of this node's local API. The credential is shown once: the node keeps only "
        "its hash. The user appears on chain only as a pseudonym."))
    add.add_argument("name")
    add.add_argument("--role", required=True, help="a role of the roles file (admin, clinician, clerk, "
                                                   "researcher, auditor, patient by default)")
    add.add_argument("--empi", help="the patient a patient-role user is bound to")
    add.add_argument("--out", metavar="FILE", help="write the credential here (mode 0600) instead of printing it")
    add.add_argument("--json", action="store_true")
    add.set_defaults(func=cmd_users_add)
    rotate = with_config(users.add_parser("rotate", help="a new credential for a user; the old one stops working"))
    rotate.add_argument("name")
    rotate.add_argument("--out", metavar="FILE", help="write the credential here (mode 0600) instead of printing it")
    rotate.add_argument("--json", action="store_true")
    rotate.set_defaults(func=cmd_users_rotate)
    revoke = with_config(users.add_parser("revoke", help="revoke a user at once (their pseudonym still resolves)"))
    revoke.add_argument("name")
    revoke.add_argument("--json", action="store_true")
    revoke.set_defaults(func=cmd_users_revoke)
    lst = with_config(users.add_parser("list", help="every user, revoked ones too (no credentials)"))
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_users_list)
    whoami = with_config(users.add_parser("whoami", help="who the credential in use belongs to, and what they may do"))
    whoami.add_argument("--json", action="store_true")
    whoami.set_defaults(func=cmd_users_whoami)

    whois = with_config(audit_commands.add_parser(
        "whois", help="the user behind a pseudonym: here, or asked of another institution on chain",
        description="Resolve a user pseudonym of this institution; with --at, ask that institution on chain "
        "(whois.request, for --case): its answer is committed too, sealed to this member."))
    whois.add_argument("pseudonym")
    whois.add_argument("--at", metavar="INSTITUTION", help="ask this institution (audited on chain)")
    whois.add_argument("--case", help="what the request is for: a case or inspection reference. It is on chain, "
                                      "readable by every member: never a name")
    whois.add_argument("--timeout", type=float, default=30.0)
    whois.add_argument("--json", action="store_true")
    whois.set_defaults(func=cmd_audit_whois)
