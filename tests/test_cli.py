import json
from functools import partial

from tests.commands import cli

ehrnode = partial(cli, timeout=300)


def test_sim_prints_the_summary_line_and_exits_zero_when_all_hold():
    run = ehrnode("sim", "--scenarios", "4", "--seed", "7", "--validators", "4", "--byzantine", "1")
    assert run.returncode == 0, run.stdout + run.stderr
    last = run.stdout.strip().splitlines()[-1]
    fields = dict(item.split("=") for item in last.split())
    assert fields["scenarios"] == "4" and fields["safety_violations"] == "0" and fields["liveness_failures"] == "0"
    assert int(fields["commits"]) > 0


def test_sim_json_is_one_document():
    run = ehrnode("sim", "--scenarios", "2", "--validators", "7", "--json", "--jobs", "1")
    assert run.returncode == 0
    doc = json.loads(run.stdout)
    assert doc["scenarios"] == 2 and doc["failures"] == []


def test_sim_refuses_more_byzantine_validators_than_it_tolerates():
    run = ehrnode("sim", "--validators", "4", "--byzantine", "2")
    assert run.returncode == 2
    assert "exceeds f=1" in run.stderr and run.stdout == ""
