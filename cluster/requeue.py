"""Whether a job stopped by its preemption/time-limit signal, or by a hang the watchdog caught, goes back in
the queue: within --max-requeues, and only when its newest checkpoint moved forward since the last requeue
(otherwise it would loop on the same stale state, burning allocation for nothing); and, before that, whether a
job with spare nodes that hung or lost a node restarts inside its allocation instead (decide_restart). A job
that finished or failed otherwise never gets here (cluster.executor ends it as it is)."""

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


@dataclass(frozen=True)
class RestartDecision:
    restart: bool
    reason: str


def decide_restart(
    *,
    cause: str,
    restarts_done: int,
    max_restarts: int,
    healthy: list[str],
    nodes: int,
    step: int | None,
    step_at_last_restart: int | None,
) -> RestartDecision:
    """Whether a job with spare nodes that hung or lost a node goes on in a new step of its allocation
    (cluster.restart) instead of the queue: within --max-restarts of this allocation, with `nodes` among its
    `healthy` hosts (the allocation less those its steps failed on), and, as for a requeue, only when its newest
    checkpoint moved forward since the last restart. A refusal falls back to decide_requeue."""
    if restarts_done >= max_restarts:
        return RestartDecision(False, f"already restarted {restarts_done} time(s) in this allocation, the "
                                      f"--max-restarts limit")
    if len(healthy) < nodes:
        return RestartDecision(False, f"{len(healthy)} healthy node(s) left in the allocation for {nodes}")
    if restarts_done > 0 and (step or 0) <= (step_at_last_restart or 0):
        return RestartDecision(False, f"no progress since the last restart (newest checkpoint still at step "
                                      f"{step or 0})")
    where = f"step {step}" if step is not None else "the start (no checkpoint yet)"
    return RestartDecision(True, f"{cause}; restart {restarts_done + 1}/{max_restarts} in the allocation resumes "
                                 f"from {where}")
