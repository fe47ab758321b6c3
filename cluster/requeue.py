"""When a stopped job goes back in the queue: only after a preemption signal, within --max-requeues, and
only when its newest checkpoint moved forward since the last requeue (otherwise it would loop on the same
stale state, burning allocation for nothing)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequeueDecision:
    requeue: bool
    reason: str


def decide_requeue(
    *,
    finished: bool,
    stop_signal: str | None,
    requeues_done: int,
    max_requeues: int,
    step: int | None,
    step_at_last_requeue: int | None,
) -> RequeueDecision:
    """finished: training exited 0; stop_signal: the preemption/time-limit signal the job got, if any;
    step: the newest complete checkpoint's step (None: none yet)."""
    if finished:
        return RequeueDecision(False, "training finished")
    if stop_signal is None:
        return RequeueDecision(False, "training failed without a preemption signal (a real error)")
    if requeues_done >= max_requeues:
        return RequeueDecision(False, f"already requeued {requeues_done} time(s), the --max-requeues limit")
    if requeues_done > 0 and (step or 0) <= (step_at_last_requeue or 0):
        return RequeueDecision(
            False, f"no progress since the last requeue (newest checkpoint still at step {step or 0})"
        )
    where = f"step {step}" if step is not None else "the start (no checkpoint yet)"
    return RequeueDecision(True, f"{stop_signal} received; requeue {requeues_done + 1}/{max_requeues} resumes from {where}")
