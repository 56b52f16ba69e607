"""The systemd notify protocol, against a datagram socket standing in for systemd."""

import os
import signal
import socket
import subprocess
import sys
import time

from ehrnode.consortium import init_consortium
from ehrnode.localnet import free_base_port
from ehrnode.sdnotify import Notifier


def test_notifier_is_silent_without_systemd_and_reads_the_watchdog():
    assert Notifier({}).notify("READY=1")
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent/sock", "WATCHDOG_USEC": "4000000"})
    assert n.watchdog_interval == 2.0
    assert not n.notify("READY=1")  # failure is reported, not swallowed
    assert Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_interval is None


def test_abstract_socket_names_are_supported():
    name = f"@ehrnode-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name[1:])
        assert Notifier({"NOTIFY_SOCKET": name}).notify("READY=1", "STATUS=ok")
        assert sock.recv(1024) == b"READY=1\nSTATUS=ok"


def test_a_node_reports_ready_watchdog_and_stopping(tmp_path):
    init_consortium(tmp_path / "c", ["A"], "R", base_port=free_base_port(2))
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(30)
        env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="400000")
        proc = subprocess.Popen([sys.executable, "-m", "ehrnode.cli", "run", "--config",
                                 str(tmp_path / "c" / "A" / "node.toml")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        env.pop("WATCHDOG_PID", None)
        try:
            messages = []
            deadline = time.monotonic() + 30
            while sum("WATCHDOG=1" in m for m in messages) < 3 and time.monotonic() < deadline:
                messages.append(sock.recv(4096).decode())
            assert any(m.startswith("READY=1") for m in messages)
            ready = next(i for i, m in enumerate(messages) if m.startswith("READY=1"))
            assert sum("WATCHDOG=1" in m for m in messages[ready:]) >= 2
            proc.send_signal(signal.SIGTERM)
            while "STOPPING=1" not in messages[-1]:
                messages.append(sock.recv(4096).decode())
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
