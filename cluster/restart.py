"""Restart inside the allocation (`llaunch submit --spare-nodes K`): the job holds N + K nodes and runs its srun
step on N of them; when a node hangs or fails, the job goes on from its newest checkpoint in a new step on the
healthy nodes, a spare in the failed one's place, without going back to the queue.

Two sides, one record. The first node's task decides (cluster.executor, with cluster.requeue.decide_restart)
and, to restart, writes the next step's task into submitit's pickle (one more restart, the failed host among
those the allocation's steps exclude, the queue's countdown untouched) and a restart event into the job's
ledger that names the next attempt; then its step ends. The batch script, after every step
(cluster.submission.restart_lines), asks cluster.teardown, which asks `next_step_nodes`: while a restart names
an attempt that has not started, srun runs submitit's command again with `--exclude` of the failed hosts.
Past --max-restarts (or without the healthy nodes) the task requeues the job as without spares.

This is what nvidia-resiliency-ext's in-job restart does with its hot spares (ft_launcher keeps standby nodes
in the allocation and a restart round swaps an unhealthy node for one of them, excluding it; release notes
v0.7.0, nvidia.github.io/nvidia-resiliency-ext), and what torchrun's elastic agent does on a membership change
(a failure is a scale-down, --max-restarts counts every restart round; pytorch.org/docs/stable/elastic/
quickstart.html): here the restart is a new SLURM step rather than a new rendezvous round in the same agents, so
a hung node's processes end with its step and a fresh doctor and watchdog start with the next.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from submitit.core.utils import DelayedSubmission, JobPaths, temporary_save_path

from cluster import job_events
from cluster.exclusion import node_hostnames
from cluster.requeue import decide_restart


def restart_in_allocation(task, job_id: str, cause: str, culprits: list[str], nodes: int, step: int | None,
                          submitted_pickle: Path) -> str | None:
    """Restart `task`'s job in a new step of its allocation without the `culprits` hosts (none to blame: empty),
    when cluster.requeue.decide_restart says so: the next task goes into `submitted_pickle`, the restart into the
    job's ledger. Returns what the attempt ends with, or None for a requeue instead."""
    allocation = node_hostnames(os.environ["SLURM_JOB_NODELIST"])
    excluded = sorted({*task.excluded, *culprits})
    decision = decide_restart(cause=cause, restarts_done=task.step_restarts, max_restarts=task.max_step_restarts,
                              healthy=[host for host in allocation if host not in excluded], nodes=nodes,
                              step=step, step_at_last_restart=task.step_at_last_restart)
    print(f"[llaunch] {'restart' if decision.restart else 'no restart'}: {decision.reason}", flush=True)
    if not decision.restart:
        return None
    following = dataclasses.replace(task, step_restarts=task.step_restarts + 1, excluded=tuple(excluded),
                                    step_at_last_restart=step)
    current = DelayedSubmission.load(submitted_pickle)
    delayed = DelayedSubmission(following)
    delayed.set_timeout(current._timeout_min, current._timeout_countdown)  # a restart spends no requeue
    with temporary_save_path(submitted_pickle) as tmp:
        delayed.dump(tmp)
    job_events.restarted(task.job_dir, task.attempt(job_id), following.attempt(job_id), excluded, decision.reason)
    return f"restarting in the allocation without {', '.join(excluded) or 'any node'}"


def next_step_nodes(folder: str | Path, job_id: str) -> list[str] | None:
    """srun's node choice for the job's next step when its first node's task restarted it (the hosts its steps
    failed on excluded), else None; once per restart (the job's ledger records the step). The previous step's
    results are removed, so that a next step whose first task is killed is seen undecided (cluster.teardown)."""
    paths = JobPaths(folder, job_id=job_id)
    task = DelayedSubmission.load(paths.submitted_pickle).function
    inc = task.attempt(job_id) if getattr(task, "step_restarts", 0) else None
    if inc is None or not job_events.restart_pending(task.job_dir, inc):
        return None
    for result in Path(folder).glob(f"{job_id}_*_result.pkl"):
        result.unlink()
    job_events.new_step(task.job_dir, inc, list(task.excluded))
    return [f"--exclude={','.join(task.excluded)}"] if task.excluded else []
