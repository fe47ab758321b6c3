"""Straggler score on synthetic busy times: a slow rank is flagged after two windows and cleared after two
normal ones; ordinary jitter over 300 windows flags no one, at 2 ranks and at 16."""

from __future__ import annotations

import random

import pytest

from launcher.observe.straggler import StragglerTracker, straggler_scores


def jittered(rng, world, base=0.05, jitter=0.2):
    """Per-rank window medians under ordinary load: each rank's busy time off by up to +-jitter."""
    return [base * (1 + rng.uniform(-jitter, jitter)) for _ in range(world)]


@pytest.mark.parametrize("world", [2, 16])
def test_clean_runs_are_never_flagged(world):
    rng = random.Random(world)
    tracker = StragglerTracker()
    for _ in range(300):
        tracker.update(jittered(rng, world))
        assert not tracker.flagged


@pytest.mark.parametrize("world", [2, 16])
def test_a_rank_150_ms_slower_is_flagged_after_two_windows_and_cleared_after_two(world):
    rng = random.Random(0)
    tracker = StragglerTracker()

    def window(slow):
        busy = jittered(rng, world)
        busy[1] += 0.15 if slow else 0.0
        return busy

    tracker.update(window(slow=True))
    assert not tracker.flagged  # one window is not enough
    tracker.update(window(slow=False))
    tracker.update(window(slow=True))
    assert not tracker.flagged  # nor two that are not consecutive
    tracker.update(window(slow=True))
    assert tracker.flagged == {1}
    tracker.update(window(slow=False))
    assert tracker.flagged == {1}  # one good window does not clear it
    tracker.update(window(slow=False))
    assert not tracker.flagged


def test_scores_use_the_others_median_and_spread():
    assert straggler_scores([0.1]) == [0.0]
    scores = straggler_scores([0.1, 0.1, 0.1, 0.1, 0.4])
    assert scores[4] == pytest.approx((0.4 - 0.1) / 0.02) and max(scores[:4]) == 0
    spread_out = straggler_scores([0.1, 0.2, 0.3, 0.4, 0.5, 0.35])  # others' MAD 0.1 -> spread 0.148
    assert spread_out[5] == pytest.approx((0.35 - 0.3) / (1.4826 * 0.1))


def test_record_fields_for_metrics():
    record = StragglerTracker().record([0.05, 0.2])
    assert record["busy_s"] == [0.05, 0.2] and record["stragglers"] == [] and record["straggler_score"][1] > 3
