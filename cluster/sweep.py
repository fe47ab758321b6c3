"""A sweep on SLURM (launcher.sweep plans it): its elements as ONE job array, and what `llaunch status`, `cancel`
and `submit --wait` know about it.

submitit's `SlurmExecutor.submit_array` writes one sbatch script with `--array=0-(N-1)%P` (P: `array_parallelism`,
the `--max-parallel` throttle) and runs element i as array task i, each an ordinary NodeTask (cluster.executor) for
its own job dir. An array task is a SLURM job of its own, `<array>_<task>`, and submitit's JobEnvironment.job_id
is that id: a task's `checkpoint()` rewrites its own `<array>_<task>_submitted.pkl` and its requeue is `scontrol
requeue <array>_<task>` (submitit/slurm/slurm.py: SlurmJobEnvironment._requeue, SlurmExecutor.
_internal_process_submissions), so an element requeues and resumes alone; requeueing the array's id would take
every task back (Lightning-AI/pytorch-lightning#15022). Elements may share a first node: each has its own
rendezvous port (cluster.submission.rendezvous_port).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cluster import job_events
from cluster import notify
from cluster.executor import NodeTask
from cluster.sbatch import SBATCH_ERRORS, sbatch_refused, slurm_executor
from cluster.snapshot import FrozenCode
from cluster.jobs import JobState, cancel, job_state, wait_for_end
from cluster.profile import ClusterProfile
from cluster.submission import ContainerJob, training_parameters
from launcher.env import slurm_conf_for_submitit
from launcher.errors import LaunchError
from launcher.jobdir.sweep_dir import SweepDir, SweepElement, SweepRecord
from launcher.observe import event_ledger, goodput
from launcher.observe.metrics_file import last_eval, last_metrics


def is_element_id(job_id: str) -> bool:
    """`<array>_<task>`: one element of a sweep (llaunch submits arrays for sweeps only)."""
    return "_" in job_id


def array_parameters(profile: ClusterProfile, name: str, container: ContainerJob | None, count: int,
                     max_parallel: int | None, folder: Path) -> dict:
    """submitit's parameters of the sweep's array (what --dry-run renders): a training job's (its teardown
    after srun too), with `count` tasks of which at most `max_parallel` (all: None) run at once."""
    return {**training_parameters(profile, name, folder, sys.executable, container), "map_count": count,
            "array_parallelism": max_parallel or count}


def submit_array(sweep_dir: SweepDir, tasks: list[NodeTask], profile: ClusterProfile, name: str,
                 env: dict[str, str], container: ContainerJob | None, max_parallel: int | None,
                 frozen: FrozenCode | None = None) -> str:
    """One sbatch for every element, run from the sweep's frozen code; returns the array's job id. Each
    element's ledger gets its submission, and the profile's notify hook hears it."""
    executor = slurm_executor(sweep_dir.slurm, profile, name, env, container, frozen)
    executor.update_parameters(array_parallelism=max_parallel or len(tasks))
    submitted_at = time.time()
    try:
        with slurm_conf_for_submitit(env):
            jobs = executor.submit_array(tasks)
    except SBATCH_ERRORS as err:
        raise sbatch_refused(err) from None
    for task, job in zip(tasks, jobs):
        job_events.submitted(task.job_dir, job.job_id, profile.nodes, profile.signal_delay_s, t=submitted_at)
        notify.notify(profile.notify, task.job_dir, job.job_id, notify.SUBMITTED)
    return str(jobs[0].job_id).partition("_")[0]


def element_states(record: SweepRecord, env: dict[str, str]) -> list[JobState]:
    """Each element's state: scontrol answers for an array task by its `<array>_<task>` id, pending or not."""
    return [job_state(record.element_job_id(i), env) for i in range(len(record.elements))]


def wait_for_sweep(record: SweepRecord, env: dict[str, str]) -> list[JobState]:
    """Block until every element has ended (each requeue of one keeps the wait going)."""
    return [wait_for_end(record.element_job_id(i), env) for i in range(len(record.elements))]


def cancel_sweep(record: SweepRecord, env: dict[str, str]) -> list[str]:
    """scancel the array (every element, pending or running); returns the ids of the elements it ended."""
    live = [record.element_job_id(i) for i, state in enumerate(element_states(record, env))
            if not state.finished and state.state != "UNKNOWN"]
    if live:
        cancel(record.array_job_id, env)
    return live


@dataclass(frozen=True)
class ElementRow:
    """One line of the sweep's table: an element's state and where its training stands."""

    element: SweepElement
    job_id: str
    state: str
    step: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    eval_step: int | None = None
    goodput: float | None = None

    @classmethod
    def read(cls, element: SweepElement, job_id: str, state: JobState, job_dir) -> "ElementRow":
        metrics, evaluation = last_metrics(job_dir), last_eval(job_dir)
        return cls(element, job_id, state.state + (f" (requeued {state.restarts})" if state.restarts else ""),
                   step=metrics["step"] if metrics else None, loss=float(metrics["loss"]) if metrics else None,
                   eval_loss=_finite(evaluation.get("eval_loss")) if evaluation else None,
                   eval_step=evaluation["step"] if evaluation else None, goodput=_goodput(job_dir))


def _finite(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _goodput(job_dir) -> float | None:
    """The share of the element's wall time that trained, None before its ledger says anything."""
    try:
        events = event_ledger.read(job_dir)
    except LaunchError:
        return None
    return goodput.analyse(events).goodput if events else None


def describe_sweep(array_job_id: str, sweep_dir: SweepDir, env: dict[str, str]) -> list[str]:
    """`llaunch status SWEEP`: one row per element, then the best element by its newest eval loss."""
    record = SweepRecord.load(sweep_dir)
    rows = [ElementRow.read(element, record.element_job_id(i), state, sweep_dir.element(element.name))
            for i, (element, state) in enumerate(zip(record.elements, element_states(record, env)))]
    lines = [f"sweep {array_job_id} ({record.name}): {len(rows)} element(s) as one job array, in {sweep_dir.root}"]
    lines += table(rows)
    scored = [row for row in rows if row.eval_loss is not None]
    if scored:
        best = min(scored, key=lambda row: row.eval_loss)
        lines.append(f"  best by eval loss: {best.element.name} (job {best.job_id}), eval loss {best.eval_loss:.4f} "
                     f"at step {best.eval_step}: {sweep_dir.element(best.element.name)}")
    else:
        lines.append("  best by eval loss: none yet (no element has evaluated)")
    lines.append(f"  one element: llaunch status|logs|cancel {record.element_job_id(0)}   all: llaunch cancel "
                 f"{array_job_id}")
    return lines


def table(rows: list[ElementRow]) -> list[str]:
    def cell(value, fmt: str) -> str:
        return "-" if value is None else fmt.format(value)

    cells = [(row.job_id, row.element.name, row.state, cell(row.step, "{}"), cell(row.loss, "{:.4f}"),
              cell(row.eval_loss, "{:.4f}"), cell(row.goodput, "{:.1%}")) for row in rows]
    header = ("job", "element", "state", "step", "loss", "eval loss", "goodput")
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    return ["  " + "  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
            for line in [header, *cells]]
