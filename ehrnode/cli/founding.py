"""Founding: ``consortium init`` and ``keys init``, which make keys and files, not calls to a node."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import (
    Commands,
    UsageError,
    names,
    positive,
)


def cmd_consortium_init(args: argparse.Namespace) -> int:
    from ..consortium import CERTS_DIR, found_consortium, init_consortium

    if args.members:
        if args.institutions or args.regulator:
            raise UsageError("--members founds from the members' own public halves: leave out --institutions and "
                             "--regulator")
        genesis = found_consortium(args.dir, args.members, tls=not args.no_tls)
        if args.json:
            print(json.dumps({"chain_id": genesis.chain_id, "genesis_hash": genesis.hash.hex(),
                              "genesis": str(args.dir / "genesis.toml"),
                              "members": [{"name": m.name, "role": m.role, "address": str(m.address)}
                                          for m in genesis.members]}))
            return 0
        print(f"consortium {genesis.chain_id}: {args.dir / 'genesis.toml'} (genesis {genesis.hash.hex()[:16]})")
        for m in genesis.members:
            print(f"  {m.name:<16} {m.role:<12} peer {m.address}")
        certificates = f", ca/ca.pem and {CERTS_DIR}/<its name>.pem (as keys/tls.pem)"
        files = "genesis.toml" + ("" if args.no_tls else certificates)
        print(f"send each member {files}; no member's private key is here"
              + ("" if args.no_tls else f"; keep {args.dir / 'ca' / 'ca.key'} offline"))
        return 0
    if not args.institutions or not args.regulator:
        raise UsageError("name the members: --members FILE... (their `keys init` public halves), or, for a "
                         "consortium kept on one machine, --institutions A,B,... --regulator R")
    genesis = init_consortium(
        args.dir, args.institutions, args.regulator, host=args.host, base_port=args.base_port, hosts=args.hosts,
        tls=not args.no_tls,
    )
    if args.json:
        print(json.dumps({
            "chain_id": genesis.chain_id, "genesis_hash": genesis.hash.hex(),
            "members": [{"name": m.name, "role": m.role, "address": str(m.address),
                         "config": str(args.dir / m.name / "node.toml")} for m in genesis.members],
        }))
    else:
        print(f"consortium {genesis.chain_id} in {args.dir} (genesis {genesis.hash.hex()[:16]})")
        for m in genesis.members:
            print(f"  {m.name:<16} {m.role:<12} peer {m.address}  config {args.dir / m.name / 'node.toml'}")
    print(f"ehrnode: every member's private keys were made here, in {args.dir}: for a demo, tests or a test bed. "
          "A real consortium is founded with `keys init` at each member and `consortium init --members`.",
          file=sys.stderr)
    return 0


def cmd_keys_init(args: argparse.Namespace) -> int:
    from ..config import Address
    from ..consortium import MEMBER_FILE, keys_init

    config, member = keys_init(args.out, args.name, args.role, Address.parse(args.address, "--address"),
                               tls=not args.no_tls)
    public = {k: v for k, v in member.items() if k != "tls_request"}
    if args.json:
        print(json.dumps({**public, "config": str(config.path), "member_file": str(args.out / MEMBER_FILE)}))
        return 0
    print(json.dumps(public, indent=2))
    print(f"keys in {args.out / 'keys'} (0600; master.key never leaves this institution); node configuration "
          f"{config.path}; send {args.out / MEMBER_FILE} (public: keys, address"
          f"{'' if args.no_tls else ', TLS certificate request'}) to the founder", file=sys.stderr)
    return 0


def register(commands: Commands) -> None:
    consortium = commands.group("consortium")
    init = consortium.add_parser(
        "init", help="found a consortium: genesis.toml from the members' public halves (or, for tests and "
                     "demos, every member's keys and node.toml in one place)",
        description="With --members: the genesis from each member's member.json (`ehrnode keys init` at each "
        "member), the epoch 0 key and the EMPI key sealed to each member, and with TLS (the default) the "
        "consortium CA and each member's certificate from its request; no private key of a member is ever "
        "here. With --institutions and --regulator: every member's keys (0600), genesis.toml and node.toml in "
        "one directory, for a demo, tests or a test bed. Refuses to overwrite existing files.",
    )
    init.add_argument("dir", type=Path, help="directory to create the consortium in")
    init.add_argument("--members", type=Path, nargs="+", metavar="MEMBER.json",
                      help="the members' public halves, from `ehrnode keys init`")
    init.add_argument("--institutions", type=names, help="comma-separated institution names (all in one place)")
    init.add_argument("--regulator", help="the regulator's name (all in one place)")
    init.add_argument("--host", default="127.0.0.1", help="host in every member's peer address")
    init.add_argument("--hosts", type=names, default=None,
                      help="one host per member (institutions, then the regulator); each listens on --base-port")
    init.add_argument("--base-port", type=positive, default=7100,
                      help="first peer port (members take consecutive ports; API ports start 100 higher)")
    init.add_argument("--no-tls", action="store_true",
                      help="no consortium CA and no certificates: plaintext peer links and local APIs (a loopback "
                           "experiment only; by default peer links and APIs are mutually authenticated TLS 1.3)")
    init.add_argument("--tls", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for scripts
    init.add_argument("--json", action="store_true", help="print one JSON document")
    init.set_defaults(func=cmd_consortium_init)

    keys = commands.group("keys")
    keys_init_ = keys.add_parser(
        "init", help="this member's own keys, node.toml and public half (member.json), made on its own machine",
        description="Create this member's signing, sealing and records keys (0600) and, unless --no-tls, its TLS "
        "key and certificate request, in OUT/keys; OUT/node.toml; and OUT/member.json, the public half to send to "
        "the founder (`consortium init --members`) or, to join later, to a current member "
        "(`consortium propose add --member-file`). Prints the public half only.")
    keys_init_.add_argument("--name", required=True)
    keys_init_.add_argument("--role", choices=("institution", "regulator"), default="institution")
    keys_init_.add_argument("--address", required=True, metavar="HOST:PORT",
                            help="where the other members reach this node's peer port")
    keys_init_.add_argument("--out", type=Path, required=True, help="directory for the keys and node.toml")
    keys_init_.add_argument("--no-tls", action="store_true", help="no TLS key or certificate request")
    keys_init_.add_argument("--json", action="store_true")
    keys_init_.set_defaults(func=cmd_keys_init)
