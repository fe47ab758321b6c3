"""How soon a job reaches its last step under seeded exponential failures, saving by save_strategy auto or at a
fixed interval: pure Python, times scaled down (1 s steps), so it runs in CI.

    python bench/cadence_sim.py [--trials 200] [--out bench/results/cadence_sim.json]

Each trial draws one failure sequence (a Poisson process on wall time, mean MTBF) and runs every policy against
it. A start costs R (startup and restore; failures strike then too), a save blocks for C, and a failure sends
the job back to its last checkpoint. `auto` is llaunch's own rule (launcher.observe.goodput.plan_interval), fed what the
ledger would hold: the measured C and R and the failures so far; `auto+history` also gets the running time and
failures of 20 earlier jobs and of the earlier trials, as launcher.observe.history.cluster_history gives it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.observe.goodput import plan_interval  # noqa: E402

STEPS, STEP_S, SAVE_S, RESTART_S = 200, 1.0, 0.35, 5.0
POLICIES = ("auto", "auto+history", "fixed 10 s", "fixed 120 s")


def failure_times(mtbf_s: float, seed: int, horizon_s: float) -> list[float]:
    rng, t, times = random.Random(seed), 0.0, []
    while t < horizon_s:
        t += rng.expovariate(1.0 / mtbf_s)
        times.append(t)
    return times


def run_job(policy: str, failures_at: list[float], history: tuple[float, int] = (0.0, 0)) -> dict:
    """Wall time to STEPS steps, the failures met, and the intervals the policy chose."""
    t, step, saved, failures, measured_c = 0.0, 0, 0, 0, None
    pending = iter(failures_at)
    next_failure = next(pending)
    intervals = []

    def advance(seconds: float) -> bool:
        """Spend `seconds`; False when a failure came first (the clock then stands at the failure)."""
        nonlocal t, next_failure
        if t + seconds < next_failure:
            t += seconds
            return True
        t = next_failure
        next_failure = next(pending)
        return False

    while step < STEPS:
        if not advance(RESTART_S):  # a start: startup + restore
            failures += 1
            continue
        step, since_save = saved, 0.0
        interval = _interval(policy, measured_c, t, failures, history)
        intervals.append(interval)
        alive = True
        while alive and step < STEPS:
            alive = advance(STEP_S)
            if not alive:
                break
            step += 1
            since_save += STEP_S
            if since_save >= interval and step < STEPS:
                alive = advance(SAVE_S)
                if alive:
                    saved, since_save, measured_c = step, 0.0, SAVE_S
                    interval = _interval(policy, measured_c, t, failures, history)
                    intervals.append(interval)
        if not alive:
            failures += 1
    return {"wall_s": t, "failures": failures, "intervals": intervals}


def _interval(policy: str, measured_c: float | None, running_s: float, failures: int, history: tuple[float, int]) -> float:
    if policy.startswith("fixed"):
        return float(policy.split()[1])
    interval, _, _ = plan_interval(STEP_S, measured_c, RESTART_S, running_s, failures, nodes=1,
                                   history=history if policy == "auto+history" else (0.0, 0))
    return interval


def compare(mtbf_s: float, trials: int, seed: int = 0, earlier_jobs: int = 20) -> dict:
    """Mean time to STEPS steps per policy over `trials` seeded failure sequences (the same ones for all), and
    auto+history's paired gain over each fixed interval with its standard error. The cluster's history starts
    with `earlier_jobs` jobs run before the comparison."""
    results = {policy: [] for policy in POLICIES}
    chosen = []
    history = (0.0, 0)
    for trial in range(earlier_jobs):
        outcome = run_job("auto+history", failure_times(mtbf_s, -1 - trial - seed * 100_003, 1e6), history)
        history = (history[0] + outcome["wall_s"], history[1] + outcome["failures"])
    for trial in range(trials):
        failures_at = failure_times(mtbf_s, seed * 100_003 + trial, horizon_s=1e6)
        for policy in POLICIES:
            outcome = run_job(policy, failures_at, history)
            results[policy].append(outcome["wall_s"])
            if policy == "auto+history":
                chosen.extend(outcome["intervals"][1:])
                history = (history[0] + outcome["wall_s"], history[1] + outcome["failures"])
    gains = {}
    for policy in POLICIES[2:]:
        diffs = [b - a for a, b in zip(results["auto+history"], results[policy])]
        gains[policy] = (statistics.fmean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5)
    return {"mtbf_s": mtbf_s, "trials": trials,
            "mean_wall_s": {policy: statistics.fmean(walls) for policy, walls in results.items()},
            "gain_s": gains, "median_auto_interval_s": statistics.median(chosen) if chosen else None}


def table(rows: list[dict]) -> str:
    head = (f"{'MTBF':>6}  " + "  ".join(f"{policy:>13}" for policy in POLICIES) + "  auto+history interval"
            + "".join(f"  sooner than {policy:<11}" for policy in POLICIES[2:]))
    lines = [head, "-" * len(head)]
    for row in rows:
        cells = "  ".join(f"{row['mean_wall_s'][policy]:>11.1f} s" for policy in POLICIES)
        gains = "".join(f"  {row['gain_s'][policy][0]:>12.1f} ± {row['gain_s'][policy][1]:.1f} s" for policy in POLICIES[2:])
        lines.append(f"{row['mtbf_s']:>4.0f} s  {cells}  {row['median_auto_interval_s']:>19.1f} s{gains}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = [compare(mtbf, args.trials) for mtbf in (60.0, 600.0)]
    print(f"mean wall time to {STEPS} steps of {STEP_S:g} s (save {SAVE_S:g} s, restart {RESTART_S:g} s), "
          f"{args.trials} seeded failure sequences each")
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
