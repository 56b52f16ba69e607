"""A consortium of local processes: `consortium init`, then one `ehrnode run` per member.

Used by ``ehrnode demo``, the tests and the benchmarks: it picks free loopback ports,
starts and stops members (SIGTERM, or SIGKILL to simulate a crash), and talks to each
member through its local API. TLS is on unless asked otherwise, as for any consortium.
With ``founded``, it sets up the way a real consortium is founded: each member makes its
own keys in its own directory (``keys init``), the founder builds the genesis from their
public halves (``consortium init --members``, in ``root/founding``) and each member takes
the genesis, the CA certificate and its own certificate from there.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from .client import ApiClient
from .config import Address, Genesis, NodeConfig, load_node_config
from .consortium import (
    API_PORT_OFFSET,
    CERTS_DIR,
    FHIR_PORT_OFFSET,
    GENESIS_FILE,
    MEMBER_FILE,
    METRICS_PORT_OFFSET,
    found_consortium,
    init_consortium,
    keys_init,
    new_member,
)
from .errors import ConfigError, EhrnodeError

NAMES = ["A", "B", "C", "R"]


def _found(root: Path, names: Sequence[str], base: int, *, tls: bool) -> Genesis:
    """Each member's own keys, the founder's genesis, and each member taking its files (the
    last name is the regulator)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        keys_init(root / name, name, "regulator" if i == len(names) - 1 else "institution",
                  Address("127.0.0.1", base + i), tls=tls)
    founding = root / "founding"
    genesis = found_consortium(founding, [root / n / MEMBER_FILE for n in names], tls=tls)
    for name in names:
        shutil.copyfile(founding / GENESIS_FILE, root / name / GENESIS_FILE)
        if tls:
            shutil.copyfile(founding / "ca" / "ca.pem", root / name / "ca.pem")
            shutil.copyfile(founding / CERTS_DIR / f"{name}.pem", root / name / "keys" / "tls.pem")
    return genesis


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


#: Below Linux's default ephemeral range (32768-60999): a port free when chosen cannot then be
#: taken by some client's outgoing connection before the node binds it.
PORTS = (10000, 32000)


def free_base_port(count: int) -> int:
    for _ in range(200):
        base = random.randrange(*PORTS)
        offsets = (0, API_PORT_OFFSET, METRICS_PORT_OFFSET, FHIR_PORT_OFFSET)
        if all(_free(base + offset + i) for i in range(count) for offset in offsets):
            return base
    raise ConfigError("no free ports for a local consortium on 127.0.0.1")


class LocalConsortium:
    """Members of one consortium as `ehrnode run` processes on this machine, driven through their APIs."""

    def __init__(self, root: Path, names: Sequence[str] = NAMES, *, tls: bool = True, founded: bool = False) -> None:
        self.root = root
        self.names = list(names)
        base = free_base_port(len(self.names))
        if founded:
            self.genesis = _found(root, self.names, base, tls=tls)
        else:
            self.genesis = init_consortium(root, self.names[:-1], self.names[-1], base_port=base, tls=tls)
        self.configs: dict[str, NodeConfig] = {n: load_node_config(root / n / "node.toml") for n in self.names}
        self.procs: dict[str, subprocess.Popen] = {}

    def new_member(self, name: str, role: str = "institution") -> NodeConfig:
        """Keys and configuration for a member joining later (``consortium new-member``), on a
        free port; proposing it is up to the current members."""
        port = free_base_port(1)
        key = self.root / self.names[0] / "keys" / "consortium.key" if role == "institution" else None
        genesis = next(p for p in (self.root / GENESIS_FILE, self.root / "founding" / GENESIS_FILE) if p.exists())
        config, _ = new_member(self.root, genesis, name, role, Address("127.0.0.1", port),
                               consortium_key=key, ca=next((d for d in (self.root / "ca", self.root / "founding" / "ca")
                                                            if d.exists()), None))
        self.names.append(name)
        self.configs[name] = config
        return config

    def log_path(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def start(self, name: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path(name), "ab") as log:
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

    def stop_all(self) -> dict[str, int]:
        """SIGTERM to every running member at once; their exit codes (-9 if one had to be killed)."""
        procs, self.procs = self.procs, {}
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        codes = {}
        for name, proc in procs.items():
            try:
                codes[name] = proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes

    def log(self, name: str) -> str:
        return self.log_path(name).read_text(errors="replace")

    async def call(self, member: str, method: str, /, **params):
        async with ApiClient.connect(self.configs[member]) as client:
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
        raise EhrnodeError(f"members {names} not connected to each other within {timeout:.0f} s", reason="timeout")

    async def wait_oprf_key(self, names: list[str], timeout: float = 120.0) -> float:
        """Wait until each of ``names`` holds its share of the consortium's first OPRF key (made when
        a consortium first starts; recording waits for it); returns the seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            views = [(await self.call(n, "status"))["oprf"] for n in names]
            if all(v and v.get("held") == 0 for v in views):
                return time.monotonic() - started
            await trio.sleep(0.1)
        raise EhrnodeError(f"members {names} hold no OPRF key share after {timeout:.0f} s", reason="timeout")

    async def wait_settled(self, timeout: float = 120.0) -> float:
        """Wait for the work a consortium does once after it starts, so that what is measured next
        is its steady state: the first OPRF key held by the members that record, and their record
        worker processes started (a second or more of CPU each, for their imports). Returns the
        seconds waited."""
        started = time.monotonic()
        recording = [n for n in self.procs if self.genesis.member(n).role == "institution"
                     and self.configs[n].master_key_path is not None]
        if recording:
            await self.wait_oprf_key(recording, timeout)

        def workers(name: str) -> int:
            configured = self.configs[name].record_workers
            return (os.cpu_count() or 1) if configured is None else configured

        prestarting = [n for n in recording if self.configs[n].record_prestart and workers(n) >= 2]
        while prestarting:
            prestarting = [n for n in prestarting if "records.workers_" not in self.log(n)]
            if time.monotonic() - started > timeout:
                raise EhrnodeError(f"record workers of {prestarting} not started after {timeout:.0f} s",
                                   reason="timeout")
            await trio.sleep(0.2)
        return time.monotonic() - started

    async def wait_height(self, names: list[str], height: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            statuses = [await self.status(n) for n in names]
            if all(s is not None and s["height"] >= height for s in statuses):
                return
            await trio.sleep(0.2)
        raise EhrnodeError(f"members {names} did not reach height {height} within {timeout:.0f} s", reason="timeout")

    async def wait_caught_up(self, names: list[str], timeout: float = 60.0) -> None:
        """Wait until ``names`` have committed every block that any answering member had when asked:
        what one member has committed (and answered for) is then also what ``names`` read."""
        heights = [s["height"] for n in self.procs if (s := await self.status(n)) is not None]
        await self.wait_height(names, max(heights, default=0), timeout)

    async def height(self, name: str) -> int:
        status = await self.status(name)
        if status is None:
            raise EhrnodeError(f"member {name} is not answering", reason="unreachable")
        return status["height"]

    async def chain(self, name: str, up_to: int) -> list[str]:
        async with ApiClient.connect(self.configs[name]) as client:
            return [(await client.call("block.get", height=h))["id"] for h in range(1, up_to + 1)]
