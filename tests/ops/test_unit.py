"""The systemd unit in deploy/: verified by systemd-analyze where it exists."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "ehrnode@.service"


def test_unit_declares_notify_watchdog_state_and_hardening():
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "StateDirectory=ehrnode/%i", "UMask=0077", "ProtectSystem=strict",
                 "PrivateTmp=yes", "NoNewPrivileges=yes", "SystemCallFilter=@system-service",
                 "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
                 "ExecStart=/usr/local/bin/ehrnode run --config /etc/ehrnode/%i/node.toml"):
        assert line in text, line


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    ehrnode = Path(sys.executable).with_name("ehrnode")
    if not ehrnode.exists():
        pytest.skip("the ehrnode console script is not installed next to this Python")
    unit = tmp_path / "ehrnode@.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/ehrnode", str(ehrnode)))
    run = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "ehrnode@HospitalA.service")],
                         capture_output=True, text=True, timeout=60)
    problems = [line for line in (run.stdout + run.stderr).splitlines() if "ehrnode@" in line]
    assert run.returncode == 0 and not problems, run.stdout + run.stderr
