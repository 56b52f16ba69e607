"""Four members on four network namespaces (deploy/netns.sh): what crosses a real network.

A 2/2 split stops commits without crashing anyone; healed, commits resume; a member cut
off alone catches up after the heal. Needs root and iproute2; skipped (saying why) where
namespaces cannot be created.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ehrnode.consortium import init_consortium

NETNS = Path(__file__).resolve().parents[2] / "deploy" / "netns.sh"
NAMES = ["A", "B", "C", "R"]


def _can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    probe = f"ehrprobe{os.getpid() % 1000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class NamespaceBed:
    def __init__(self, root: Path) -> None:
        self.root = root
        tag = random.randrange(100, 1000)
        self.env = dict(os.environ, PREFIX=f"ehr{tag}", SUBNET=f"10.{random.randrange(100, 200)}.{tag % 250}")
        self.hosts = [f"{self.env['SUBNET']}.{i + 1}" for i in range(len(NAMES))]
        self.procs: dict[int, subprocess.Popen] = {}

    def net(self, *args: str) -> None:
        subprocess.run([str(NETNS), *args], check=True, env=self.env, capture_output=True, text=True)

    def config(self, i: int) -> str:
        return str(self.root / NAMES[i] / "node.toml")

    def start(self, i: int) -> None:
        log = open(self.root / f"{NAMES[i]}.log", "ab")
        self.procs[i] = subprocess.Popen(
            [str(NETNS), "exec", str(i), sys.executable, "-m", "ehrnode.cli", "run", "--config", self.config(i)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env,
        )
        log.close()

    def cli(self, i: int, *args: str, timeout: float = 90) -> dict:
        run = subprocess.run([str(NETNS), "exec", str(i), sys.executable, "-m", "ehrnode.cli", *args,
                              "--config", self.config(i), "--json"],
                             capture_output=True, text=True, env=self.env, timeout=timeout)
        if run.returncode != 0:
            raise RuntimeError(f"{NAMES[i]}: {' '.join(args)}: {run.stderr.strip()}")
        return json.loads(run.stdout)

    def heights(self) -> list[int]:
        return [self.cli(i, "status")["height"] for i in range(len(NAMES))]

    def wait(self, what: str, predicate, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except RuntimeError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}")

    def log_tail(self, name: str, lines: int = 40) -> str:
        return "\n".join((self.root / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> dict[int, int]:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        codes = {}
        for i, proc in self.procs.items():
            try:
                codes[i] = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[i] = -9
        self.procs.clear()
        return codes


@pytest.fixture
def testbed(tmp_path):
    reason = _can_make_namespaces()
    if reason:
        pytest.skip(reason)
    bed = NamespaceBed(tmp_path / "consortium")
    bed.net("up", str(len(NAMES)))
    try:
        init_consortium(bed.root, NAMES[:-1], NAMES[-1], base_port=7100, hosts=bed.hosts)
        yield bed
    finally:
        bed.stop()
        bed.net("down")


def test_split_heal_and_a_member_cut_off_alone(testbed):
    n = len(NAMES)
    for i in range(n):
        testbed.start(i)
    testbed.wait("all four connected", lambda: all(len(testbed.cli(i, "status")["peers"]) == n - 1 for i in range(n)))
    first = testbed.cli(0, "tx", "submit", "--note", "before the split", "--wait")
    assert first["height"] >= 1

    # 2/2: neither side has a quorum of 3.
    testbed.net("split", "0 1", "2 3")
    time.sleep(1.0)
    stalled = testbed.heights()
    testbed.cli(0, "tx", "submit", "--note", "during the split")
    time.sleep(6.0)
    after = testbed.heights()
    # Nothing new: at most a block certified before the split commits. A member behind when the
    # heights were read may still catch up, from its own side, to what the others had committed.
    assert max(after) <= max(stalled) + 1, (stalled, after)
    assert all(proc.poll() is None for proc in testbed.procs.values())

    # Healed: commits resume everywhere.
    testbed.net("heal")
    testbed.wait("commits after the heal", lambda: all(h >= max(after) + 2 for h in testbed.heights()))

    # R cut off alone: the other three commit; healed, R catches up to the same chain.
    testbed.net("isolate", "3")
    for k in range(3):
        testbed.cli(0, "tx", "submit", "--note", f"while R is cut off {k}", "--wait")
    target = testbed.cli(0, "status")["height"]
    assert testbed.cli(3, "status")["height"] < target
    testbed.net("heal")
    testbed.wait("R catching up", lambda: testbed.cli(3, "status")["height"] >= target)
    ours = testbed.cli(0, "block", "get", "--height", str(target))["id"]
    theirs = testbed.cli(3, "block", "get", "--height", str(target))["id"]
    assert ours == theirs
    codes = testbed.stop()
    failed = {NAMES[i]: code for i, code in codes.items() if code != 0}
    assert not failed, "\n".join(f"{name} exited {code}; its log ends:\n{testbed.log_tail(name)}"
                                  for name, code in failed.items())
