"""Whether a job stopped by its preemption/time-limit signal, or by a hang the watchdog caught, goes back in
the queue: within --max-requeues, and only when its newest checkpoint moved forward since the last requeue
(otherwise it would loop on the same stale state, burning allocation for nothing). A job that finished or
failed otherwise never gets here (cluster.executor ends it as it is)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequeueDecision:
    requeue: bool
    reason: str


def decide_requeue(
    *,
    cause: str,
    requeues_done: int,
    max_requeues: int,
    step: int | None,
    step_at_last_requeue: int | None,
) -> RequeueDecision:
    """cause: what stopped the attempt, for the reason ("SIGUSR2 received", "hang on n2"); step: the newest complete checkpoint's step (None: none yet); step_at_last_requeue: the same when
    the job was last requeued (None: never requeued)."""
    if requeues_done >= max_requeues:
        return RequeueDecision(False, f"already requeued {requeues_done} time(s), the --max-requeues limit")
    if requeues_done > 0 and (step or 0) <= (step_at_last_requeue or 0):
        return RequeueDecision(
            False, f"no progress since the last requeue (newest checkpoint still at step {step or 0})"
        )
    where = f"step {step}" if step is not None else "the start (no checkpoint yet)"
    return RequeueDecision(True, f"{cause}; requeue {requeues_done + 1}/{max_requeues} resumes from {where}")
