"""bench/cadence_sim.py: under seeded exponential failures (mean 60 s and 600 s) save_strategy auto's own rule,
given the cluster's failure history, picks a shorter interval where failures are frequent and reaches 200 steps
sooner than saving every 10 s or every 120 s."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import cadence_sim  # noqa: E402


def test_auto_interval_follows_the_failure_rate_and_beats_both_fixed_intervals():
    frequent, rare = (cadence_sim.compare(mtbf, trials=150) for mtbf in (60.0, 600.0))
    assert 5 < frequent["median_auto_interval_s"] < 10 < rare["median_auto_interval_s"] < 30
    for row in (frequent, rare):
        for fixed in ("fixed 10 s", "fixed 120 s"):
            gain, error = row["gain_s"][fixed]
            assert gain > 2 * error > 0, (row["mtbf_s"], fixed, row["gain_s"])
    print("\n" + cadence_sim.table([frequent, rare]))


def test_a_failure_sends_the_job_back_to_its_last_checkpoint():
    failures_at = [30.5, 1e9]  # one failure 25.5 s into training (after the 5 s start), none after
    outcome = cadence_sim.run_job("fixed 10 s", failures_at)
    saves_before = 2  # at steps 10 and 20, each 0.35 s
    lost = 25.5 - 20 - saves_before * cadence_sim.SAVE_S
    expected = 2 * cadence_sim.RESTART_S + 200 + 19 * cadence_sim.SAVE_S + lost
    assert outcome["failures"] == 1 and abs(outcome["wall_s"] - expected) < 1e-6
