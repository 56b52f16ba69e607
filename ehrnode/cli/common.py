"""What every command shares: the node to talk to, the user to act as, argument types, output.

Each command group is a module of this package with a ``register(commands)`` function; the
groups several modules add to (``records``, ``keys``, ``audit``...) are made once, by whichever
registers first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from ..errors import EhrnodeError

T = TypeVar("T")


#: The command groups, and what each is for (``ehrnode --help``).
GROUPS = {
    "consortium": "set up a consortium, and govern its membership",
    "keys": "this member's own keys, and the consortium's epoch keys",
    "api": "the local API",
    "block": "committed blocks",
    "tx": "transactions",
    "records": "patient records: add, list, show, pull, erase",
    "vault": "the institution's private chain",
    "deid": "de-identification: what a profile releases",
    "audit": "access trails, disclosures and leak tracing, from the chain",
    "empi": "the consortium's master patient index",
    "consent": "patients' consent, on chain",
    "users": "this node's users: add, list, revoke, rotate",
}


class Commands:
    """The ``ehrnode`` subcommands being registered: top-level commands and shared groups."""

    def __init__(self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        self._subparsers = subparsers
        self._groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}

    def add(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        """A top-level command: ``ehrnode NAME``."""
        return self._subparsers.add_parser(name, **kwargs)

    def group(self, name: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        """The group ``ehrnode NAME ...`` (its subcommand lands in ``args.NAME_command``), made by
        whichever module registers in it first."""
        if name not in self._groups:
            self._groups[name] = self._subparsers.add_parser(name, help=GROUPS[name]).add_subparsers(
                dest=f"{name}_command", required=True)
        return self._groups[name]


def with_config(p: argparse.ArgumentParser, *, offline: bool = False,
                user_flags: tuple[str, ...] = ("--user", "--as")) -> argparse.ArgumentParser:
    """The options of a command that works on a node: its node.toml and, unless offline, the user to act as."""
    p.add_argument("--config", help="node.toml (default: $EHRNODE_CONFIG)")
    if not offline:
        p.add_argument(*user_flags, dest="user", metavar="NAME",
                       help="act as this user of the node (default: $EHRNODE_USER, else the node's own "
                            "admin with api.token)")
        p.add_argument("--credential", metavar="FILE",
                       help="the user's credential file (default: $EHRNODE_CREDENTIAL)")
    return p


class UsageError(EhrnodeError):
    """A command-line argument that cannot be used."""

    reason = "usage"


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def config_path(args: argparse.Namespace) -> Path:
    path = args.config or os.environ.get("EHRNODE_CONFIG")
    if not path:
        raise UsageError("no node configuration: pass --config PATH or set EHRNODE_CONFIG")
    return Path(path)


def run_client(args: argparse.Namespace, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(client)`` against the node of ``--config``."""
    import trio

    from ..client import ApiClient
    from ..config import load_node_config

    config = load_node_config(config_path(args))
    user, credential = credential_of(args)

    async def go() -> T:
        async with ApiClient.connect(config, user=user, credential=credential) as client:
            return await work(client)

    return trio.run(go)


def credential_of(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The user to act as and their credential (None, None: the node's own admin, from api.token)."""
    user = getattr(args, "user", None) or os.environ.get("EHRNODE_USER") or None
    path = getattr(args, "credential", None) or os.environ.get("EHRNODE_CREDENTIAL") or None
    if path is None:
        return user, None
    try:
        credential = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the credential file {path}: {exc}") from exc
    if not credential:
        raise UsageError(f"the credential file {path} is empty")
    return user, credential


def call(args: argparse.Namespace, method: str, **params: object) -> object:
    return run_client(args, lambda client: client.call(method, **params))


class UnexpectedAnswer(EhrnodeError):
    """The node answered with something other than the method's documented shape."""

    reason = "unexpected_answer"


def call_object(args: argparse.Namespace, method: str, **params: object) -> dict[str, Any]:
    """Call a method whose answer is a JSON object."""
    answer = call(args, method, **params)
    if not isinstance(answer, dict):
        raise UnexpectedAnswer(f"{method}: the node answered {type(answer).__name__}, not an object")
    return answer


def call_rows(args: argparse.Namespace, method: str, **params: object) -> list[Any]:
    """Call a method whose answer is a JSON array."""
    answer = call(args, method, **params)
    if not isinstance(answer, list):
        raise UnexpectedAnswer(f"{method}: the node answered {type(answer).__name__}, not an array")
    return answer


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """The JSON object in the file ``path`` (``what`` it should be, for the error)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read {what}: {exc}") from exc
    if not isinstance(doc, dict):
        raise UsageError(f"{path}: expected {what}, a JSON object")
    return doc


def iso(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def show(args: argparse.Namespace, answer: Any, text: Callable[[Any], Iterable[str]]) -> None:
    """Print an answer: with --json as one JSON document for scripts, otherwise as text(answer)'s lines."""
    if getattr(args, "json", False):
        print(json.dumps(answer))
        return
    for line in text(answer):
        print(line)


def show_rows(args: argparse.Namespace, rows: list[Any], line: Callable[[Any], str], *, none: str = "") -> None:
    """Print rows: with --json as one JSON array, otherwise one line each (or ``none`` if there are none)."""
    show(args, rows, lambda rs: [line(r) for r in rs] or ([none] if none else []))
