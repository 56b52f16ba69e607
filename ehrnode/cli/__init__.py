"""The ``ehrnode`` command: one module per command group, each registering its subcommands.

Every command that works on a running node calls its local API (``common.call``) and prints
the answer, as a table for people or, with ``--json``, as one JSON document for scripts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import EhrnodeError
from . import chain, consent, consortium, daemon, empi, founding, records, sharing, sim, users
from .common import Commands, UsageError

__all__ = ["UsageError", "build_parser", "main"]

# In the order `ehrnode --help` lists them.
GROUPS = (founding, consortium, daemon, chain, records, sharing, empi, consent, users, sim)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ehrnode", description="Consortium-chain node for sharing patient records.")
    commands = Commands(parser.add_subparsers(dest="command", required=True))
    for group in GROUPS:
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except EhrnodeError as exc:
        print(f"ehrnode: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
