"""When to save under `save_strategy: auto` or `save_interval_s`: a time interval turned into a step, agreed by all.

Rank 0 measures the step time and the blocking save cost, reads the restart cost and the failures from the
job's ledger and from those of the cluster's earlier jobs (launcher.observe.history), picks the interval
(launcher.observe.goodput.plan_interval, or save_interval_s as given) and broadcasts the step of the next save, so
every rank saves at the same step and none saves alone. It plans again after every save and at the start of
every incarnation, that is after every failure. Each incarnation reads the ledgers once, at its first plan: a
week-long job's ledger holds hundreds of MB, and its saves must cost what its first ones did. A save that
fails here is not fatal: the run goes on and tries again one interval later; a ledger that cannot be read
counts as an empty one.
"""

from __future__ import annotations

import sys
import time

import torch.distributed as dist

from launcher.observe import goodput

from launcher.observe import history

from launcher.observe import event_ledger
from launcher.errors import LaunchError

# Changes smaller than this do not repeat the log line (the interval is replanned after every save).
RELOG_CHANGE = 0.2


def _agree(error: str) -> str:
    """Every rank learns the first rank's error ('' when none failed)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), "")


def _broadcast(value):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class SaveCadence:
    def __init__(self, job_dir, training, rank: int, nodes: int, events: event_ledger.RankLedger):
        self.job_dir = job_dir
        self.auto = training.save_strategy == "auto"
        self.fixed_s = training.save_interval_s
        self.active = self.auto or self.fixed_s is not None
        self.overhead_cap = training.save_overhead_cap
        self.rank, self.nodes, self.events = rank, nodes, events
        self.next_step: int | None = None
        self.mark: tuple[int, float] | None = None  # (step, time) where the current stretch of training began
        self.save_cost_s: float | None = None
        self.logged_interval: float | None = None
        self.history: tuple[float, int] | None = None  # the cluster's earlier jobs, read once per incarnation
        self.so_far: tuple[goodput.Report, float] | None = None  # this job's ledger, read once, and when

    def step_end(self, step: int, save, wait) -> None:
        """At every step boundary on every rank: save when the agreed step has come, plan the next one."""
        now = time.time()
        if self.mark is None:  # the first step of the incarnation (warm-up): time from the second on
            self.mark = (step, now)
            return
        step_time = (now - self.mark[1]) / max(1, step - self.mark[0])
        if self.next_step is None:
            self._plan(step, step_time)
        elif step >= self.next_step:
            started = time.time()
            error = _agree(self._attempt(wait)) or _agree(self._attempt(save))
            if error:
                self.events.append(event_ledger.SAVE, step=step, ok=False, error=error)
            else:
                self.save_cost_s = time.time() - started
            self._plan(step, step_time, failed=error)

    @staticmethod
    def _attempt(fn) -> str:
        try:
            fn()
        except LaunchError as err:
            return str(err)
        return ""

    def _plan(self, step: int, step_time: float, failed: str = "") -> None:
        decision = None
        if self.rank == 0:
            interval, text, inputs = self._interval(step_time)
            steps = max(1, round(interval / max(step_time, 1e-9)))
            decision = step + steps
            if failed:
                print(f"llaunch: warning: checkpoint at step {step} failed ({failed}); training goes on and tries "
                      f"again at step {decision} ({interval:.0f} s from now)", flush=True)
            last = self.logged_interval
            if last is None or abs(interval - last) > RELOG_CHANGE * last:
                self.logged_interval = interval
                print(f"llaunch: {text} = every {steps} step(s) of {step_time:.3g} s; next at step {decision}",
                      flush=True)
                self.events.append(event_ledger.CADENCE, step=step, steps=steps, step_time_s=step_time, **inputs)
        self.next_step = _broadcast(decision)
        self.mark = (step, time.time())

    def _interval(self, step_time: float) -> tuple[float, str, dict]:
        """Rank 0: the interval in seconds, the sentence that explains it and its inputs."""
        if not self.auto:
            return float(self.fixed_s), f"checkpoint every {self.fixed_s:g} s (save_interval_s)", {"interval_s": self.fixed_s}
        report, running_s = self._job_so_far()
        save_cost = self.save_cost_s if self.save_cost_s is not None else report.save_cost_s
        if self.history is None:
            self.history = history.cluster_history(self.job_dir)
        return goodput.plan_interval(step_time, save_cost, report.restart_cost_s, running_s, report.failures,
                                     self.nodes, self.overhead_cap, self.history, report.warning_s)

    def _job_so_far(self) -> tuple[goodput.Report, float]:
        """This job's report from its ledger, read at the incarnation's first plan, and its running time now:
        the report's, plus the time since the read, which this incarnation spent running (goodput counts
        queue and down time out of it, and neither happens while its ranks live). Restarts, failures and the
        preemption warning change only between incarnations."""
        if self.so_far is None:
            try:
                events = event_ledger.read(self.job_dir)
            except LaunchError as err:
                print(f"llaunch: warning: {err} The checkpoint cadence goes on without this job's history.",
                      file=sys.stderr, flush=True)
                events = []
            report = goodput.analyse(events)
            report.pieces = []  # a long job's timeline: not kept for the incarnation's lifetime
            self.so_far = (report, time.time())
        report, read_at = self.so_far
        return report, report.running_s + max(0.0, time.time() - read_at)
