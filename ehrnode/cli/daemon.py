"""Running a node and keeping it: ``run``, ``backup``, ``restore``, ``demo``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EhrnodeError, innermost
from .common import (
    Commands,
    UsageError,
    config_path,
    iso,
    with_config,
)

if TYPE_CHECKING:
    from ..api import ApiServer
    from ..daemon.node import Node
    from ..rest import FhirServer


def cmd_run(args: argparse.Namespace) -> int:
    import trio

    from .. import logs
    from ..api import CATALOGUE, ApiServer
    from ..config import load_node_config
    from ..daemon.node import Node
    from ..rest import FhirServer
    from ..users.roles import load_roles

    config = load_node_config(config_path(args))
    logs.configure(config.log_level)
    roles = load_roles(config.roles_path, CATALOGUE)  # a bad roles file stops the node before it starts
    node = Node(config)
    api = ApiServer(node, roles)
    fhir = None
    if node.fhir_base is not None:
        fhir = FhirServer(api.gate, node.fhir_base, node.tls.api_server if node.tls is not None else None)
    try:
        trio.run(_serve_until_signalled, node, api, fhir)
    except BaseException as group:
        exc = innermost(group)
        if isinstance(exc, OSError):
            raise UsageError(f"cannot listen: {exc.strerror or exc}") from group
        if isinstance(exc, EhrnodeError) and exc is not group:
            raise exc from group
        raise
    finally:
        node.close()
    return 0


async def _serve_until_signalled(node: Node, api: ApiServer, fhir: FhirServer | None) -> None:
    import signal
    from functools import partial

    import trio

    listen = node.config.api_listen
    listeners = [partial(api.serve, listen.host, listen.port)]
    if fhir is not None and node.config.fhir_listen is not None:
        listeners.append(partial(fhir.serve, node.config.fhir_listen.host, node.config.fhir_listen.port))
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(node.run, listeners=listeners))
            async for signum in signals:
                node.log.info("node.stopping", signal=signal.Signals(signum).name)
                break
            # Peers first (closed with 1001, no new ones), then every task; the stores are
            # closed only once nothing can write to them any more (cmd_run's finally).
            await node.shutdown()
            nursery.cancel_scope.cancel()


def _passphrase(args: argparse.Namespace) -> str:
    if args.passphrase_file:
        try:
            return Path(args.passphrase_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--passphrase-file: cannot read {args.passphrase_file}: {exc}") from exc
    value = os.environ.get("EHRNODE_BACKUP_PASSPHRASE")
    if not value:
        raise UsageError("a backup passphrase is needed: --passphrase-file FILE or $EHRNODE_BACKUP_PASSPHRASE")
    return value


def cmd_backup(args: argparse.Namespace) -> int:
    from ..backup import create_backup
    from ..config import load_node_config

    manifest = create_backup(load_node_config(config_path(args)), Path(args.out), _passphrase(args))
    if args.json:
        print(json.dumps(manifest))
    else:
        heights = ", ".join(f"{k} {v}" for k, v in manifest["heights"].items())
        print(f"backup of {manifest['node']} written to {args.out} ({manifest['bytes']} bytes, encrypted): "
              f"{len(manifest['files'])} files; {heights}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from ..backup import restore_backup
    from ..config import load_node_config

    manifest = restore_backup(load_node_config(config_path(args)), Path(args.file), _passphrase(args))
    if args.json:
        print(json.dumps(manifest))
    else:
        print(f"{manifest['node']} restored from the backup of {iso(manifest['created'])} "
              f"({', '.join(f'{k} {v}' for k, v in manifest['heights'].items())}). Start the node: it asks the "
              "other validators how far the chain got before it signs anything, and catches up from them. "
              "Records written after the backup are not in it.")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(args.dir)


def register(commands: Commands) -> None:
    run = with_config(commands.add("run", help="run the node in the foreground until SIGTERM or SIGINT"),
                      offline=True)
    run.set_defaults(func=cmd_run)

    backup = with_config(commands.add(
        "backup", help="an encrypted online backup of this node's stores and keys",
        description="Snapshot the block store, ledger state and vault while the node runs, with the keys, "
        "into one file encrypted under a passphrase (scrypt, AES-256-GCM). Safety data is not included."),
        offline=True)
    backup.add_argument("--out", required=True, metavar="FILE", help="the backup file to create (mode 0600)")
    backup.add_argument("--passphrase-file", help="default: $EHRNODE_BACKUP_PASSPHRASE")
    backup.add_argument("--json", action="store_true")
    backup.set_defaults(func=cmd_backup)
    restore = with_config(commands.add(
        "restore", help="bring a node back from a backup (into an empty data directory)",
        description="Restore the stores and keys of a backup. The node then signs nothing until 2f+1 other "
        "validators report how far the chain got, and catches up from its peers."), offline=True)
    restore.add_argument("file", metavar="FILE")
    restore.add_argument("--passphrase-file", help="default: $EHRNODE_BACKUP_PASSPHRASE")
    restore.add_argument("--json", action="store_true")
    restore.set_defaults(func=cmd_restore)

    demo = commands.add(
        "demo", help="a whole local consortium, end to end, in one command",
        description="Set up three hospitals and a regulator on this machine, run them as real node "
        "processes, commit transactions, crash and recover a node, and stop everything cleanly.",
    )
    demo.add_argument("--dir", type=Path, help="keep the consortium's files here (default: a temporary directory)")
    demo.set_defaults(func=cmd_demo)
