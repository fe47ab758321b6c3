"""Submitting a job (or a sweep's array) to SLURM through submitit: the executor, the node task srun runs on
each node (cluster.executor.NodeTask), sbatch's refusal as one sentence."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import submitit

from cluster import job_events, notify
from cluster.exclusion import exclusion_sentence, quarantined_nodes
from cluster.executor import NodeTask
from cluster.profile import ClusterProfile
from cluster.snapshot import FrozenCode
from cluster.submission import ContainerJob, step_python, training_parameters
from launcher.env import slurm_conf_for_submitit
from launcher.errors import LaunchError
from launcher.jobdir.layout import JobDir
from launcher.observe.node_ledger import NodeLedger

SBATCH_ERRORS = (subprocess.CalledProcessError, submitit.core.utils.FailedJobError, OSError)


def slurm_executor(folder: Path, profile: ClusterProfile, name: str, env: dict[str, str],
                   container: ContainerJob | None = None, frozen: FrozenCode | None = None) -> submitit.SlurmExecutor:
    """submitit's executor for a job (or a sweep's array) whose pickles and logs go to `folder`, its script
    starting in the frozen code, keeping the node ledger's quarantined hosts out."""
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=profile.max_requeues,
                                      python=shlex.quote(step_python(container, sys.executable)))
    params = training_parameters(profile, name, folder, sys.executable, container)  # with the teardown after srun
    executor.update_parameters(**(frozen.in_script(params) if frozen else params))
    exclude = quarantined_nodes(profile, env)
    if exclude:
        executor.update_parameters(exclude=",".join(exclude))
        print(f"llaunch: {exclusion_sentence(profile, exclude)}", flush=True)
    return executor


def node_task(job_dir: Path, profile: ClusterProfile, container: ContainerJob | None = None) -> NodeTask:
    """What srun runs on each node of the job that trains in `job_dir`."""
    wrap = tuple(container.wrap(profile.gpus_per_node > 0)) if container else ()
    return NodeTask(str(job_dir), profile.max_requeues, profile.torchrun_restarts, profile.dist_timeout_s,
                    node_ledger_path=str(NodeLedger.for_profile(profile.name).path), doctor=profile.doctor,
                    min_nodes=profile.min_nodes, wrap=wrap, python=container.container.python if wrap else "",
                    notify=profile.notify or "",
                    max_step_restarts=profile.max_restarts if profile.restarts_on_spares else 0)


def sbatch_refused(err: Exception) -> LaunchError:
    detail = str(err).strip().splitlines()
    return LaunchError(f"sbatch refused the job ({detail[-1] if detail else err.__class__.__name__}); "
                       f"check the partition, account and limits.")


def submit(job_dir: Path, profile: ClusterProfile, name: str, env: dict[str, str],
           container: ContainerJob | None = None, frozen: FrozenCode | None = None) -> submitit.Job:
    """sbatch through submitit, run from the job's frozen code; logs go to JOB_DIR/slurm/<job id>_<node>_log.{out,err}."""
    executor = slurm_executor(JobDir(job_dir).slurm, profile, name, env, container, frozen)
    task = node_task(job_dir, profile, container)
    submitted_at = time.time()
    try:
        with slurm_conf_for_submitit(env):
            job = executor.submit(task)
        job_events.submitted(job_dir, job.job_id, profile.nodes, profile.signal_delay_s, t=submitted_at)
        notify.notify(profile.notify, str(job_dir), job.job_id, notify.SUBMITTED)
        return job
    except SBATCH_ERRORS as err:
        raise sbatch_refused(err) from None
