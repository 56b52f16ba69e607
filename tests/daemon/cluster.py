"""Real consortia for tests: one `ehrnode run` process per member (see ehrnode/localnet.py)."""

from ehrnode.localnet import NAMES, LocalConsortium, free_base_port

Cluster = LocalConsortium

__all__ = ["NAMES", "Cluster", "free_base_port"]
