"""Real consortia for tests: `consortium init`, then one `ehrnode run` process per member."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import trio

from ehrnode.client import ApiClient
from ehrnode.errors import EhrnodeError
from ehrnode.config import NodeConfig, load_node_config
from ehrnode.consortium import API_PORT_OFFSET, init_consortium

NAMES = ["A", "B", "C", "R"]


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base_port(count: int) -> int:
    for _ in range(200):
        base = random.randrange(20000, 50000)
        if all(_free(base + i) and _free(base + API_PORT_OFFSET + i) for i in range(count)):
            return base
    raise RuntimeError("no free ports")


class Cluster:
    def __init__(self, root: Path, names: list[str] = NAMES) -> None:
        self.root = root
        self.names = names
        self.genesis = init_consortium(root, names[:-1], names[-1], base_port=free_base_port(len(names)))
        self.configs: dict[str, NodeConfig] = {n: load_node_config(root / n / "node.toml") for n in names}
        self.procs: dict[str, subprocess.Popen] = {}

    def log_path(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def start(self, name: str) -> None:
        log = open(self.log_path(name), "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "ehrnode.cli", "run", "--config", str(self.configs[name].path)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )

    def start_all(self) -> None:
        for name in self.names:
            self.start(name)

    def kill9(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self, name: str) -> int:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(20)

    def stop_all(self) -> None:
        for name in list(self.procs):
            proc = self.procs.pop(name)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def log(self, name: str) -> str:
        return self.log_path(name).read_text(errors="replace")

    async def call(self, name: str, method: str, **params):
        async with ApiClient.connect(self.configs[name]) as client:
            return await client.call(method, **params)

    async def status(self, name: str) -> dict | None:
        try:
            return await self.call(name, "status")
        except (EhrnodeError, OSError):
            return None

    async def wait_ready(self, names: list[str] | None = None, timeout: float = 30.0) -> None:
        """Every node answers and is connected to every other running node."""
        names = names or list(self.procs)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            statuses = [await self.status(n) for n in names]
            if all(s is not None and set(names) - {s["node"]} <= set(s["peers"]) for s in statuses):
                return
            await trio.sleep(0.2)
        raise AssertionError(f"nodes {names} not ready in {timeout}s: {statuses}")

    async def wait_height(self, names: list[str], height: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            statuses = [await self.status(n) for n in names]
            if all(s is not None and s["height"] >= height for s in statuses):
                return
            await trio.sleep(0.2)
        raise AssertionError(f"{names} did not reach height {height}: {statuses}")

    async def height(self, name: str) -> int:
        status = await self.status(name)
        assert status is not None, f"{name} is not answering"
        return status["height"]

    async def chain(self, name: str, up_to: int) -> list[str]:
        async with ApiClient.connect(self.configs[name]) as client:
            return [(await client.call("block.get", height=h))["id"] for h in range(1, up_to + 1)]
