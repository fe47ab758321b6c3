"""Straggler score, torch-free: which rank is slow, from each rank's busy time per step.

A synchronous job evens out step times (every rank waits for the slowest in the gradient reduction), so the
step time names no one. What differs is the time a rank spends on its own work before it reaches the
collective (data + forward/backward, launcher.runtime.beacon's DATA and COMPUTE phases): the slow rank is busy
longest and waits least.

Each rank's busy time (the median over a logging window, so one hiccup does not count) is compared with
the median of the *other* ranks, in units of a robust spread: 1.4826 x their median absolute deviation,
but at least 20 % of their median and 20 ms (with two ranks the others' spread is zero,
and ordinary jitter must not be read as a straggler). A rank is flagged after `windows_to_flag`
consecutive windows above `flag_above`, and cleared after `windows_to_clear` consecutive windows below
`clear_below` (hysteresis: one noisy window neither flags nor clears).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

MAD_TO_SIGMA = 1.4826  # the MAD of a normal distribution times this is its standard deviation


@dataclass
class StragglerPolicy:
    flag_above: float = 3.0
    clear_below: float = 1.5
    windows_to_flag: int = 2
    windows_to_clear: int = 2
    relative_floor: float = 0.2  # the spread is at least this fraction of the others' median busy time
    absolute_floor_s: float = 0.02  # host timers and DDP's buffer broadcast jitter by this much


def straggler_scores(busy_s: list[float], policy: StragglerPolicy | None = None) -> list[float]:
    """Per rank: (its busy time - the others' median) / the others' robust spread. 0.0 for a world of one."""
    policy = policy or StragglerPolicy()
    scores = []
    for rank, mine in enumerate(busy_s):
        others = busy_s[:rank] + busy_s[rank + 1:]
        if not others:
            return [0.0]
        middle = statistics.median(others)
        mad = statistics.median(abs(x - middle) for x in others)
        spread = max(MAD_TO_SIGMA * mad, policy.relative_floor * middle, policy.absolute_floor_s)
        scores.append((mine - middle) / spread)
    return scores


@dataclass
class StragglerTracker:
    """Rank 0 feeds it one window of busy times per logging step; it keeps the flags across windows."""

    policy: StragglerPolicy = field(default_factory=StragglerPolicy)
    flagged: set[int] = field(default_factory=set)
    _above: dict[int, int] = field(default_factory=dict)
    _below: dict[int, int] = field(default_factory=dict)

    def update(self, busy_s: list[float]) -> list[float]:
        """Score this window, update the flags; returns the scores."""
        scores = straggler_scores(busy_s, self.policy)
        for rank, score in enumerate(scores):
            high, low = score > self.policy.flag_above, score < self.policy.clear_below
            self._above[rank] = self._above.get(rank, 0) + 1 if high else 0
            self._below[rank] = self._below.get(rank, 0) + 1 if low else 0
            if self._above[rank] >= self.policy.windows_to_flag:
                self.flagged.add(rank)
            elif self._below[rank] >= self.policy.windows_to_clear:
                self.flagged.discard(rank)
        return scores

    def record(self, busy_s: list[float]) -> dict:
        """The metrics.jsonl fields of one window."""
        scores = self.update(busy_s)
        return {"busy_s": [round(b, 4) for b in busy_s], "straggler_score": [round(s, 2) for s in scores],
                "stragglers": sorted(self.flagged)}
