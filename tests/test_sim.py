"""Seeded fault scenarios. Each failing scenario's message names its seed and replay command."""

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import pytest

from ehrnode.sim import BEHAVIOURS, ScenarioResult, replay_command, run_scenario, scenario_configs

# The CI budget: 300 scenarios in all, over n=4 and n=7 with f Byzantine validators each.
BUDGET = {4: 160, 7: 140}


def _run(args) -> ScenarioResult:
    seed, n, unsafe, behaviours = args
    overrides = {"unsafe_skip_vote_rule": unsafe}
    if behaviours:
        overrides["behaviours"] = behaviours
    return run_scenario(seed, scenario_configs(n, None, **overrides))


def _sweep(n, seeds, unsafe=False, behaviours=None):
    work = [(seed, n, unsafe, behaviours) for seed in seeds]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(_run, work, chunksize=4))


@pytest.mark.parametrize("n", sorted(BUDGET))
def test_safety_and_liveness_hold_over_seeded_fault_scenarios(n):
    results = _sweep(n, range(BUDGET[n]))
    failures = [
        f"seed {r.seed}: {r.safety_violations or r.liveness_failure} (replay: "
        f"{replay_command(r.seed, scenario_configs(n, None))})"
        for r in results if not r.ok
    ]
    print(f"n={n}: {len(results)} scenarios, {sum(r.commits for r in results)} commits, "
          f"max rounds to first commit after stabilization "
          f"{max(r.rounds_to_commit or 0 for r in results)}")
    assert not failures, "\n".join(failures)
    assert all(r.commits > 0 for r in results)
    # Epochs change in most scenarios (a change asked late may not finish before the run does), some
    # with a validator crashing during the change.
    assert sum(r.epochs > 0 for r in results) >= 0.75 * len(results)
    # Most changes change the validators: spares join (catching up from genesis), validators leave.
    assert sum(r.membership_changes > 0 for r in results) >= 0.5 * len(results)
    assert any("crashing" in fault for r in results for fault in r.faults)
    assert any(fault.startswith("slow ") for r in results for fault in r.faults)
    behaviours = {b for r in results for b in r.byzantine.values()}
    assert behaviours == set(BEHAVIOURS)


def test_leaders_that_crash_or_propose_and_go_silent_are_survived_with_reputation_and_without():
    # The same seeds, leaders chosen by reputation (the default) and round robin (window 0).
    for window in (None, 0):
        default = scenario_configs(4, None).core
        config = scenario_configs(4, None, behaviours=("flaky", "silent"),
                                  core=replace(default, leader_window=window))
        failures = [r.seed for r in (run_scenario(seed, config) for seed in range(20)) if not r.ok]
        assert not failures, (window, failures)


def test_the_checker_finds_a_violation_when_honest_validators_ignore_the_lock():
    # Honest validators vote without the 2-chain vote rule; a Byzantine leader hides a
    # certificate behind a timeout certificate and proposes on an older one.
    results = _sweep(4, range(100), unsafe=True, behaviours=("stale_qc",))
    caught = [r for r in results if r.safety_violations]
    print(f"unsafe rule: {len(caught)} of {len(results)} scenarios caught")
    assert caught, "the simulator did not notice an unsafe vote rule"
    # The same scenarios with the rule in place are safe.
    safe = _sweep(4, [r.seed for r in caught], behaviours=("stale_qc",))
    assert not [r for r in safe if r.safety_violations]


def test_a_scenario_replays_exactly_from_its_seed():
    config = scenario_configs(4, None)
    a, b = run_scenario(12345, config), run_scenario(12345, config)
    assert (a.commits, a.byzantine, a.faults, a.rounds_to_commit) == (
        b.commits, b.byzantine, b.faults, b.rounds_to_commit)


def test_too_many_byzantine_validators_is_refused():
    with pytest.raises(ValueError):
        run_scenario(1, scenario_configs(4, 2))
