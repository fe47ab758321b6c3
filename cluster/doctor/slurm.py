"""`llaunch doctor --nodes K`: the checks as a short SLURM job, one task per node, collected from the job dir."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import submitit

from cluster.doctor.checks import FAIL, Check
from cluster.doctor.node import NodeContext, NodeReport, results_path, run_node
from cluster.exclusion import node_hostnames
from cluster.executor import node_address
from cluster.jobs import cancel, job_state, refuse_never_starting
from cluster.profile import ClusterProfile
from cluster.submission import rendezvous_port, slurm_parameters
from launcher.env import slurm_conf_for_submitit
from launcher.jobdir.layout import JobDir
from launcher.errors import LaunchError
from launcher.planning.plan import Plan

JOB_NAME = "llaunch-doctor"
TIME_LIMIT_MIN = 3
SIGNAL_DELAY_S = 30  # submitit always asks for a warning signal; this one comes after WAIT_S has cancelled the job
WAIT_S = 90.0  # queueing included; the checks themselves take well under a minute


class DoctorTask:
    """What srun runs on each node of the doctor job (picklable: plain fields)."""

    def __init__(self, job_dir: str, plan: dict | None, keep_checkpoints: int, trainable_params: int) -> None:
        self.job_dir, self.plan = job_dir, plan
        self.keep_checkpoints, self.trainable_params = keep_checkpoints, trainable_params

    def __call__(self) -> str:
        job_env = submitit.JobEnvironment()
        hosts = node_hostnames(os.environ["SLURM_JOB_NODELIST"])
        ctx = NodeContext(Path(self.job_dir), job_env.node, hosts, [node_address(h) for h in hosts],
                          rendezvous_port(job_env.job_id), job_id=str(job_env.job_id),
                          plan=Plan.from_dict(self.plan) if self.plan else None,
                          keep_checkpoints=self.keep_checkpoints, trainable_params=self.trainable_params)
        report = run_node(ctx)
        print("\n".join(report.lines()), flush=True)
        return report.failure_sentence() or f"doctor passed on {report.host}"


def run_doctor_job(profile: ClusterProfile, env: dict[str, str], task: DoctorTask) -> list[NodeReport]:
    """Submit the doctor job, wait for it (cancelled after WAIT_S), and read every node's report."""
    folder = JobDir(task.job_dir).doctor_logs
    executor = submitit.SlurmExecutor(folder=folder, python=shlex.quote(sys.executable))
    params = slurm_parameters(profile, JOB_NAME)
    params.update(time=TIME_LIMIT_MIN, signal_delay_s=SIGNAL_DELAY_S, additional_parameters={})  # never requeued
    executor.update_parameters(**params)
    try:
        with slurm_conf_for_submitit(env):
            job = executor.submit(task)
    except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError, OSError) as err:
        detail = str(err).strip().splitlines()
        raise LaunchError(f"sbatch refused the doctor job ({detail[-1] if detail else err.__class__.__name__}); "
                          f"check the partition, account and limits.") from None
    job_id = str(job.job_id)
    deadline = time.monotonic() + WAIT_S
    while not (state := job_state(job_id, env)).finished and state.state != "UNKNOWN":
        refuse_never_starting(job_id, state)
        if time.monotonic() > deadline:
            cancel(job_id, env)
            raise LaunchError(f"the doctor job {job_id} did not finish in {WAIT_S:.0f} s ({state.state}"
                              f"{': ' + state.reason if state.reason else ''}); it was cancelled; rerun when "
                              f"the partition has {profile.nodes} free node(s).")
        time.sleep(0.5)
    return [_report(task.job_dir, node, job_id, folder) for node in range(profile.nodes)]


def _report(job_dir: str, node: int, job_id: str, folder: Path) -> NodeReport:
    path = results_path(Path(job_dir), node)
    report = NodeReport.read(Path(job_dir), node)
    if report is None or report.job_id != job_id:
        log = folder / f"{job_id}_{node}_log.err"
        return NodeReport(node, f"node {node}", job_id, [Check("report", FAIL, (
            f"left no result in {path}; see {log}: the node failed before its checks ended, or its job dir "
            f"is not the one this machine sees."))])
    return report
