"""`ehrnode demo`: a whole local consortium, end to end, in one command.

Three hospitals and a regulator, each a real `ehrnode run` process on loopback with
its own keys, stores and local API. The demo shows what the consortium chain does
today: members submit signed transactions, all four commit the same chain, a member
killed with SIGKILL falls behind and catches up by itself after a restart while the
others keep committing, and every member stops cleanly on SIGTERM. It prints progress
as it goes and ends with a summary table; a step that fails says why and the demo
exits non-zero.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from .client import ApiClient
from .errors import EhrnodeError
from .localnet import LocalConsortium

MEMBERS = ["HospitalA", "HospitalB", "HospitalC", "Regulator"]
HOSPITALS = MEMBERS[:3]


@dataclass
class Step:
    name: str
    result: str
    seconds: float
    ok: bool = True


class DemoFailed(EhrnodeError):
    reason = "demo"


class Demo:
    def __init__(self, root: Path, out: Callable[[str], None] = print, transactions: int = 300) -> None:
        self.root = root
        self.out = out
        self.transactions = transactions
        self.steps: list[Step] = []
        self.net: LocalConsortium | None = None

    def _step(self, name: str, started: float, result: str) -> None:
        self.steps.append(Step(name, result, time.monotonic() - started))
        self.out(f"   ok: {result}")

    async def _submit(self, name: str, notes: list[str]) -> list[str]:
        assert self.net is not None
        async with ApiClient.connect(self.net.configs[name]) as client:
            ids: list[str] = []
            for start in range(0, len(notes), 100):
                result = await client.call("tx.submit_batch", notes=notes[start:start + 100])
                if result["errors"]:
                    raise DemoFailed(f"{name} refused transactions: {result['errors'][:3]}")
                ids.extend(result["tx_ids"])
            return ids

    async def _wait_committed(self, name: str, tx_ids: list[str], timeout: float = 60.0) -> int:
        """The highest height among ``tx_ids`` once all are committed at ``name``."""
        assert self.net is not None
        deadline = time.monotonic() + timeout
        remaining = list(tx_ids)
        highest = 0
        async with ApiClient.connect(self.net.configs[name]) as client:
            while remaining:
                if time.monotonic() > deadline:
                    raise DemoFailed(f"{len(remaining)} transactions not committed at {name} within {timeout:.0f} s")
                still = []
                for tx_id in remaining:
                    height = (await client.call("tx.get", tx_id=tx_id))["height"]
                    if height is None:
                        still.append(tx_id)
                    else:
                        highest = max(highest, height)
                remaining = still
                if remaining:
                    await trio.sleep(0.2)
        return highest

    async def _same_chain(self, names: list[str], height: int) -> str:
        assert self.net is not None
        heads = {}
        for name in names:
            heads[name] = (await self.net.call(name, "block.get", height=height))["id"]
        if len(set(heads.values())) != 1:
            raise DemoFailed(f"members disagree on block {height}: {heads}")
        return next(iter(heads.values()))

    async def run(self) -> None:
        started = time.monotonic()
        self.out(f"1. Setting up a consortium of {', '.join(HOSPITALS)} and the Regulator in {self.root}")
        self.net = net = LocalConsortium(self.root, MEMBERS)
        self._step("consortium init", started,
                   f"chain {net.genesis.chain_id}, keys for {len(MEMBERS)} members, genesis "
                   f"{net.genesis.hash.hex()[:16]}")

        started = time.monotonic()
        self.out("2. Starting one node process per member")
        net.start_all()
        await net.wait_ready(timeout=60)
        ports = ", ".join(f"{n} {net.configs[n].peer_listen.port}" for n in MEMBERS)
        self._step("4 nodes up", started, f"all connected to each other (peer ports: {ports})")

        started = time.monotonic()
        per = self.transactions // len(HOSPITALS)
        self.out(f"3. Each hospital submits {per} signed transactions through its local API")
        ids: list[str] = []
        for name in HOSPITALS:
            ids += await self._submit(name, [f"{name} note {k}" for k in range(per)])
        height = await self._wait_committed("Regulator", ids)
        await net.wait_height(MEMBERS, height)
        head = await self._same_chain(MEMBERS, height)
        self._step("commit", started, f"{len(ids)} transactions committed by all four by height {height}, "
                                      f"same block {head[:16]} everywhere")

        started = time.monotonic()
        self.out("4. HospitalC crashes (SIGKILL); the others keep committing")
        net.kill9("HospitalC")
        before = await net.height("HospitalA")
        more: list[str] = []
        for name in ("HospitalA", "HospitalB"):
            more += await self._submit(name, [f"{name} while C is down {k}" for k in range(per // 2)])
        reached = await self._wait_committed("HospitalA", more)
        self._step("crash", started, f"HospitalC down; A, B and the Regulator committed {len(more)} more "
                                     f"transactions (height {before} -> {reached})")

        started = time.monotonic()
        self.out("5. HospitalC restarts and catches up by itself")
        net.start("HospitalC")
        target = await net.height("HospitalA")
        await net.wait_height(["HospitalC"], target, timeout=60)
        await self._wait_committed("HospitalC", more)
        head = await self._same_chain(MEMBERS, target)
        self._step("recovery", started, f"HospitalC back at height >= {target}, same block {head[:16]} as the others")

        started = time.monotonic()
        self.out("6. Stopping every node (SIGTERM)")
        codes = net.stop_all()
        if any(codes.values()):
            raise DemoFailed(f"a node did not stop cleanly: exit codes {codes}")
        self._step("shutdown", started, "all four closed their peers and stores and exited 0")

    def summary(self) -> str:
        width = max(len(s.name) for s in self.steps) if self.steps else 10
        lines = [f"{'step':<{width}}  {'seconds':>7}  result", f"{'-' * width}  {'-' * 7}  {'-' * 40}"]
        for s in self.steps:
            lines.append(f"{s.name:<{width}}  {s.seconds:>7.1f}  {s.result}")
        return "\n".join(lines)


def run_demo(directory: Path | None, out: Callable[[str], None] = print) -> int:
    """Run the demo in ``directory`` (kept) or a temporary one (removed); returns an exit code."""
    with tempfile.TemporaryDirectory(prefix="ehrnode-demo-") as tmp:
        root = Path(directory) if directory is not None else Path(tmp)
        if directory is not None and (root / "genesis.toml").exists():
            raise DemoFailed(f"{root} already holds a consortium; pass an empty --dir")
        demo = Demo(root / "consortium" if directory is None else root, out)
        began = time.monotonic()
        try:
            trio.run(demo.run)
        except EhrnodeError as exc:
            out(f"   FAILED: {exc}")
            if demo.net is not None:
                out(f"   node logs: {demo.root}/<member>.log")
            out("")
            out(demo.summary())
            return 1
        finally:
            if demo.net is not None:
                demo.net.stop_all()
        out("")
        out(demo.summary())
        out(f"\ndemo finished in {time.monotonic() - began:.1f} s" +
            (f"; files kept in {root}" if directory is not None else ""))
        return 0
