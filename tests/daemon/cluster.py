"""Real consortia for tests: one `ehrnode run` process per member (see ehrnode/localnet.py)."""

from collections.abc import Iterator
from pathlib import Path

import trio

from ehrnode.localnet import NAMES, LocalConsortium, free_base_port

Cluster = LocalConsortium


def running(root: Path, **options) -> Iterator[LocalConsortium]:
    """A consortium at ``root``, every member started and ready, stopped when the generator is
    closed: the body of a module-scoped fixture (``yield from running(...)``)."""
    c = LocalConsortium(root, **options)
    c.start_all()
    try:
        trio.run(c.wait_ready)
        yield c
    finally:
        c.stop_all()


__all__ = ["NAMES", "Cluster", "free_base_port", "running"]
