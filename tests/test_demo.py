import subprocess
import sys


def test_demo_runs_end_to_end_and_keeps_its_files_when_asked(tmp_path):
    run = subprocess.run([sys.executable, "-m", "ehrnode.cli", "demo", "--dir", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    for step in ("consortium init", "4 nodes up", "record", "empi", "privacy", "pull", "consent", "crash", "recovery",
                 "join", "shutdown"):
        assert f"\n{step} " in out
    assert "share one EMPI across both hospitals" in out
    assert "HTTP/1.1 200 OK" in out and "x-access-log: " in out and "pulled over FHIR REST too" in out
    assert "emergency pull served and flagged" in out
    assert "HospitalD admitted" in out and "all 5 closed" in out
    assert (tmp_path / "demo" / "inputs").is_dir()  # the generated FHIR input stays for a look
    assert "FAILED" not in out
    assert (tmp_path / "demo" / "founding" / "genesis.toml").exists()
    assert '"event": "node.stopped"' in (tmp_path / "demo" / "HospitalC.log").read_text()
    again = subprocess.run([sys.executable, "-m", "ehrnode.cli", "demo", "--dir", str(tmp_path / "demo")],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already holds a consortium" in again.stderr
