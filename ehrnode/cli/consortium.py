"""Governance commands: ``consortium new-member|new-keys|members|proposals|propose|vote``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import Address
from .common import Commands, UsageError, call_object, iso, read_json_object, show, with_config


def cmd_new_member(args: argparse.Namespace) -> int:
    from ..consortium import MEMBER_FILE, new_member

    config, member = new_member(args.dir, args.genesis, args.name, args.role, Address.parse(args.address, "--address"),
                                consortium_key=args.consortium_key, ca=args.ca)
    out = {"name": member.name, "config": str(config.path), "member_file": str(args.dir / member.name / MEMBER_FILE)}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{member.name}: keys and {config.path} written; start it with `ehrnode run --config {config.path}`")
        print(f"hand {out['member_file']} to a current member to propose it: "
              f"`ehrnode consortium propose add --member-file {MEMBER_FILE}`")
    return 0


def cmd_new_keys(args: argparse.Namespace) -> int:
    from ..config import load_node_config
    from ..crypto import Identity, SealingKey
    from ..errors import CryptoError
    from .common import config_path

    config = load_node_config(config_path(args))
    signing_path, sealing_path = config.next_key_paths
    if signing_path.exists() or sealing_path.exists():
        raise UsageError(f"{signing_path.parent} already holds replacement keys: propose them, or remove them first")
    identity, sealing = Identity.generate(), SealingKey.generate()
    try:
        identity.save(signing_path)
        sealing.save(sealing_path)
    except CryptoError as exc:
        raise UsageError(str(exc)) from exc
    address = args.address or str(config.peer_listen)
    member = {"name": config.name, "signing_key": identity.public_key.hex(), "sealing_key": sealing.public_key.hex(),
              "address": address}
    text = json.dumps(member, indent=2) + "\n"
    if args.out:
        try:
            Path(args.out).write_text(text, encoding="utf-8")
        except OSError as exc:
            print(text)  # the keys are written: their public half must not be lost with the file
            raise UsageError(f"--out: cannot write {args.out}: {exc.strerror} (the public half of the keys in "
                             f"{signing_path.parent} is printed above)") from exc
    print(text if not args.out else f"new keys in {signing_path.parent}; their public half in {args.out}: "
          f"propose them with `ehrnode consortium propose rotate-key --member-file {args.out}`")
    return 0


def cmd_members(args: argparse.Namespace) -> int:
    show(args, call_object(args, "consortium.members"), lambda view: [
        f"membership epoch {view['epoch']} (from height {view['starts']}): {len(view['members'])} members, "
        f"{view['quorum']} votes adopt a change",
        *(f"  {m['index']:>3}  {m['name']:<16} {m['role']:<12} {m['address']}" for m in view["members"]),
    ])
    return 0


def cmd_proposals(args: argparse.Namespace) -> int:
    def lines(view: dict[str, Any]) -> Iterator[str]:
        for p in view["proposals"]:
            yield (f"{p['id']}  {p['status']:<8} {p['change']:<10} {p['name']:<16} by {p['proposer']} at "
                   f"{iso(p['time'])}  votes {len(p['voters'])}/{p['needed']} ({', '.join(p['voters'])})")
            if p["reason"]:
                yield f"    {p['reason']}"

    show(args, call_object(args, "consortium.proposals", **({"status": args.status} if args.status else {})), lines)
    return 0


def _member_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if args.member_file:
        member = read_json_object(args.member_file, "a member's public half (member.json)")
        params.update({k: member[k] for k in ("name", "role", "signing_key", "sealing_key", "address") if k in member})
    for flag in ("name", "role", "signing_key", "sealing_key", "address"):
        if getattr(args, flag, None):
            params[flag] = getattr(args, flag)
    if "name" not in params:
        raise UsageError("name the member (NAME or --member-file)")
    return params


def cmd_propose(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"change": args.change, "reason": args.reason, "timeout": args.timeout}
    if args.change == "remove":
        if not args.name:
            raise UsageError("remove: name the member")
        params["name"] = args.name
    else:
        params.update(_member_params(args))
    return _print_decision(args, call_object(args, "consortium.propose", **params))


def cmd_vote(args: argparse.Namespace) -> int:
    return _print_decision(args, call_object(args, "consortium.vote", proposal=args.proposal, timeout=args.timeout))


def _print_decision(args: argparse.Namespace, result: dict[str, Any]) -> int:
    def lines(result: dict[str, Any]) -> Iterator[str]:
        p = result["proposal"]
        yield f"proposal {p['id']} ({p['change']} {p['name']}): {p['status']}, votes {len(p['voters'])}/{p['needed']}"
        if p["status"] == "adopted":
            yield f"  adopted at height {p['decided']}: the next membership starts at height {p['decided'] + 1}"

    show(args, result, lines)
    return 0


def register(commands: Commands) -> None:
    from ..config import ROLES
    from ..ledger.transactions import CHANGES

    consortium = commands.group("consortium")

    join = consortium.add_parser(
        "new-member", help="keys and node.toml for a member joining an existing consortium",
        description="Write a joining member's keys (0600), its node.toml pointing at the consortium's genesis, "
        "and member.json, the public half a current member proposes it with. Its node can start at once: it "
        "follows the chain and takes part once the proposal is adopted.")
    join.add_argument("dir", type=Path, help="directory to create the member's directory in")
    join.add_argument("--genesis", type=Path, required=True, help="the consortium's genesis.toml")
    join.add_argument("--name", required=True)
    join.add_argument("--role", choices=ROLES, default="institution")
    join.add_argument("--address", required=True, help="HOST:PORT the other members reach its peer listener at")
    join.add_argument("--consortium-key", type=Path,
                      help="institutions: a copy of the consortium's EMPI pseudonym key (consortium.key)")
    join.add_argument("--ca", type=Path, help="the consortium CA's directory, to issue its TLS certificate")
    join.add_argument("--json", action="store_true")
    join.set_defaults(func=cmd_new_member)

    rekey = with_config(consortium.add_parser(
        "new-keys", help="replacement keys for this member, for a rotate-key proposal",
        description="Write keys/signing.next.pem and sealing.next.pem (0600) and print their public half. "
        "Once a rotate-key proposal naming them is adopted, the node switches to them as the change commits "
        "and keeps the old ones renamed."), offline=True)
    rekey.add_argument("--address", help="HOST:PORT to list for this member (default: its peer listener)")
    rekey.add_argument("--out", help="write the public half (member.json) here")
    rekey.set_defaults(func=cmd_new_keys)

    members = with_config(consortium.add_parser("members", help="the consortium's members now"))
    members.add_argument("--json", action="store_true")
    members.set_defaults(func=cmd_members)

    proposals = with_config(consortium.add_parser("proposals", help="membership proposals and their votes"))
    proposals.add_argument("--status", choices=("open", "adopted", "lapsed"))
    proposals.add_argument("--json", action="store_true")
    proposals.set_defaults(func=cmd_proposals)

    propose = with_config(consortium.add_parser(
        "propose", help="propose adding, removing or re-keying a member (admin)",
        description="Put a change of membership to the current members; it is adopted once 2f+1 of them have "
        "voted for it (the proposal is this member's vote), and takes effect at the next block. add and "
        "rotate-key re-seal every epoch key so far to the member's sealing key."))
    propose.add_argument("change", choices=CHANGES)
    propose.add_argument("name", nargs="?", help="the member (default for add: the name in --member-file)")
    propose.add_argument("--member-file", help="member.json from `consortium new-member`")
    propose.add_argument("--role", choices=ROLES)
    propose.add_argument("--signing-key", help="hex Ed25519 public key")
    propose.add_argument("--sealing-key", help="hex X25519 public key")
    propose.add_argument("--address", help="HOST:PORT")
    propose.add_argument("--reason", default="", help="why, for the record (on chain, readable by anyone)")
    propose.add_argument("--timeout", type=float, default=30.0)
    propose.add_argument("--json", action="store_true")
    propose.set_defaults(func=cmd_propose)

    vote = with_config(consortium.add_parser("vote", help="vote for an open proposal (admin)"))
    vote.add_argument("proposal", metavar="PROPOSAL_ID")
    vote.add_argument("--timeout", type=float, default=30.0)
    vote.add_argument("--json", action="store_true")
    vote.set_defaults(func=cmd_vote)
