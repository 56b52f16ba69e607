"""``ehrnode sim``: seeded fault scenarios against the consensus core."""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from typing import TYPE_CHECKING

from .common import (
    Commands,
    UsageError,
    non_negative,
    positive,
)

if TYPE_CHECKING:
    from ..sim import ScenarioResult


def _run_one(work: tuple[int, int, int | None]) -> ScenarioResult:
    from ..sim import run_scenario, scenario_configs

    seed, validators, byzantine = work
    return run_scenario(seed, scenario_configs(validators, byzantine))


def _print_failure(result: ScenarioResult, replay: str) -> None:
    print(f"FAIL seed={result.seed} byzantine={result.byzantine}")
    for line in result.safety_violations:
        print(f"  safety: {line}")
    if result.liveness_failure:
        print(f"  liveness: {result.liveness_failure}")
    for fault in result.faults:
        print(f"  fault: {fault}")
    print(f"  replay: {replay}")


def cmd_sim(args: argparse.Namespace) -> int:
    from ..sim import replay_command, scenario_configs

    f = (args.validators - 1) // 3
    if args.byzantine is not None and args.byzantine > f:
        raise UsageError(f"--byzantine {args.byzantine} exceeds f={f} for {args.validators} validators")
    config = scenario_configs(args.validators, args.byzantine)
    work = [(seed, args.validators, args.byzantine) for seed in range(args.seed, args.seed + args.scenarios)]
    jobs = min(args.jobs or os.cpu_count() or 1, len(work))
    violations = liveness = commits = epochs = changes = 0
    failures: list[ScenarioResult] = []
    with ProcessPoolExecutor(max_workers=jobs) if jobs > 1 else nullcontext() as pool:
        results = pool.map(_run_one, work, chunksize=4) if pool else map(_run_one, work)
        for result in results:
            commits += result.commits
            epochs += result.epochs
            changes += result.membership_changes
            violations += len(result.safety_violations)
            liveness += result.liveness_failure is not None
            if not result.ok:
                failures.append(result)
                if not args.json:
                    _print_failure(result, replay_command(result.seed, config))
    summary: dict[str, object] = {
        "scenarios": args.scenarios, "safety_violations": violations, "liveness_failures": liveness, "commits": commits,
        "epoch_changes": epochs, "membership_changes": changes,
    }
    if args.json:
        summary["failures"] = [
            {"seed": r.seed, "byzantine": {str(k): v for k, v in r.byzantine.items()}, "safety": r.safety_violations,
             "liveness": r.liveness_failure, "faults": r.faults, "replay": replay_command(r.seed, config)}
            for r in failures
        ]
        print(json.dumps(summary))
    else:
        print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 1 if violations or liveness else 0


def register(commands: Commands) -> None:
    sim = commands.add(
        "sim", help="run seeded fault scenarios against the consensus core on a virtual clock",
        description="Drive N in-memory validators through seeded faults (crashes, partitions, delay, drop, "
        "duplication, Byzantine validators) and check safety and liveness.",
    )
    sim.add_argument("--scenarios", type=positive, default=100, help="how many scenarios (seeds) to run")
    sim.add_argument("--seed", type=non_negative, default=0, help="first seed; scenario k uses seed+k")
    sim.add_argument("--validators", type=positive, default=4, help="validators per scenario (n = 3f+1)")
    sim.add_argument("--byzantine", type=non_negative, default=None, help="Byzantine validators (default: f)")
    sim.add_argument("--jobs", type=non_negative, default=0, help="worker processes (default: one per core)")
    sim.add_argument("--json", action="store_true", help="print one JSON document")
    sim.set_defaults(func=cmd_sim)
