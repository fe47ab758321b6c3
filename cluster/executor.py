"""Submitting a planned job with submitit, and `NodeTask`, the picklable callable srun runs once per node.

Each node's task finds the rendezvous host, checks the allocation against the plan, and runs torchrun.
Preemption signals reach the ranks twice over: SLURM signals every process of the step, and the task
forwards what it gets (launcher.train.preemption ignores the duplicate). torchrun itself ignores them
(SIG_IGN before exec, and --signals-to-handle without SIGTERM), because it would otherwise die on
SIGUSR1/2 or kill the ranks 30 s after a SIGTERM, in the middle of their checkpoint. When the ranks have saved and exited, the first node's task
applies cluster.requeue's policy and, if it says so, hands over to submitit's own checkpoint-and-requeue.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit

from cluster.profile import ClusterProfile
from cluster.requeue import decide_requeue
from cluster.submission import node_command, rendezvous_port, slurm_parameters
from launcher.errors import LaunchError
from launcher.plan import Plan

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class TrainingError(RuntimeError):
    """The ranks failed (or stopped and may not requeue): the job ends FAILED with this message."""


def slurm_reachable(env: dict[str, str]) -> None:
    """Raise the one-sentence error `llaunch submit` prints when there is no SLURM to submit to."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        raise LaunchError("SLURM is not installed here (no sbatch); submit from a login node or run `llaunch cluster up`.")
    conf = env.get("SLURM_CONF")
    if conf and not Path(conf).is_file():  # scontrol would retry for a minute before saying so
        raise LaunchError(f"SLURM_CONF points at {conf}, which does not exist; run `llaunch cluster up` "
                          f"or export the path of your cluster's slurm.conf.")
    try:
        ping = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        ping = None
    if ping is None or ping.returncode != 0 or "UP" not in ping.stdout:
        raise LaunchError(
            "SLURM is not reachable (slurmctld does not answer); start the local cluster with `llaunch cluster up` "
            "or point SLURM_CONF at your cluster's slurm.conf."
        )


def node_hostnames(nodelist: str) -> list[str]:
    """Expand a compressed SLURM node list (n[1-3,7], gpu-a[01-02]) the way SLURM itself does."""
    result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    if result.returncode != 0 or not result.stdout.strip():
        raise RuntimeError(f"scontrol show hostnames {nodelist!r} failed: {result.stderr.strip()}")
    return result.stdout.split()


def node_address(node: str) -> str:
    """The address other nodes reach `node` at: SLURM's NodeAddr (equal to the name on most clusters)."""
    from cluster.jobs import parse_scontrol_job

    result = subprocess.run(["scontrol", "--oneliner", "show", "node", node], capture_output=True, text=True, timeout=30)
    return parse_scontrol_job(result.stdout).get("NodeAddr") or node


def check_allocation(plan: Plan, hosts: list[str], gpus_on_node: int) -> None:
    """Refuse to train on an allocation that differs from the plan (it would change the global batch)."""
    if len(hosts) != plan.nodes:
        raise TrainingError(
            f"the job got {len(hosts)} node(s) ({', '.join(hosts)}) but the plan is for {plan.nodes}; resubmit with --nodes {len(hosts)}."
        )
    if plan.device == "cuda" and gpus_on_node < plan.gpus_per_node:
        raise TrainingError(
            f"this node sees {gpus_on_node} GPU(s) but the plan needs {plan.gpus_per_node} per node; "
            f"check --gpus-per-node and the partition."
        )


def _ignore_stop_signals() -> None:
    """Runs in torchrun's process before exec: SIG_IGN survives exec, the ranks install their own handlers."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class NodeTask(submitit.helpers.Checkpointable):
    """One per node. Its fields are pickled by submitit, and `checkpoint()` hands the next attempt its
    requeue count and the step it was requeued at."""

    def __init__(self, job_dir: str, max_requeues: int, max_restarts: int, dist_timeout_s: int,
                 requeues: int = 0, step_at_last_requeue: int | None = None) -> None:
        self.job_dir = str(job_dir)
        self.max_requeues = max_requeues
        self.max_restarts = max_restarts
        self.dist_timeout_s = dist_timeout_s
        self.requeues = requeues
        self.step_at_last_requeue = step_at_last_requeue

    def __call__(self) -> str:
        job_env = submitit.JobEnvironment()
        plan = Plan.load(Path(self.job_dir) / "plan.yaml")
        hosts = node_hostnames(os.environ["SLURM_JOB_NODELIST"])
        check_allocation(plan, hosts, _gpus_on_node() if plan.device == "cuda" else 0)
        argv, extra_env = node_command(
            plan, self.job_dir, rdzv_host=node_address(hosts[0]), rdzv_port=rendezvous_port(job_env.job_id),
            job_id=job_env.job_id, max_restarts=self.max_restarts, dist_timeout_s=self.dist_timeout_s,
            cpus_per_node=len(os.sched_getaffinity(0)), python=sys.executable,
        )
        env = {**os.environ, **extra_env}
        print(f"[llaunch] node {job_env.node}/{len(hosts)} ({job_env.hostname}), attempt {self.requeues + 1}: "
              f"{shlex.join(argv)}", flush=True)
        self._received: list[signal.Signals] = []
        self._torchrun: subprocess.Popen | None = None
        # Until torchrun ends, a stop signal is recorded and passed to the ranks; submitit's handlers wait.
        submitit_handlers = {sig: signal.signal(sig, self._on_stop) for sig in STOP_SIGNALS}
        try:
            self._torchrun = subprocess.Popen(argv, env=env, preexec_fn=_ignore_stop_signals)
            while self._torchrun.poll() is None:
                time.sleep(0.5)
        finally:
            for sig, handler in submitit_handlers.items():
                signal.signal(sig, handler)
        code = self._torchrun.returncode
        stop = self._received[0].name if self._received else None
        if code == 0:
            return f"training finished on node {job_env.node}"
        if stop is None:
            raise TrainingError(f"torchrun exited with code {code} on {job_env.hostname}; the rank's error is above.")
        if job_env.global_rank != 0:
            return f"node {job_env.node} stopped by {stop}; the first node decides about the requeue"
        step = latest_step(self.job_dir)
        if stop != "SIGUSR2":
            # SIGTERM/SIGUSR1 come from scancel or SLURM preemption: SLURM requeues a preempted job itself.
            raise TrainingError(f"stopped by {stop} with the newest checkpoint at step {step}; a preempted job "
                                f"comes back through SLURM, a cancelled one ends here")
        decision = decide_requeue(stop_signal=stop, requeues_done=self.requeues,
                                  max_requeues=self.max_requeues, step=step,
                                  step_at_last_requeue=self.step_at_last_requeue)
        print(f"[llaunch] {'requeue' if decision.requeue else 'no requeue'}: {decision.reason}", flush=True)
        if not decision.requeue:
            raise TrainingError(f"job stopped by {stop} and not requeued: {decision.reason}")
        self._step_now = step
        submitit_handlers[signal.SIGUSR2](signal.SIGUSR2, None)  # self.checkpoint(), scontrol requeue, exit
        return "requeued"

    def _on_stop(self, signum, frame) -> None:
        from launcher.train.preemption import signal_ranks

        self._received.append(signal.Signals(signum))
        if self._torchrun is not None:
            signal_ranks(self._torchrun.pid, signum)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """The next attempt: same job dir, one more requeue, remembers the step it restarts from."""
        step = getattr(self, "_step_now", None)
        nxt = NodeTask(self.job_dir, self.max_requeues, self.max_restarts, self.dist_timeout_s,
                       requeues=self.requeues + 1, step_at_last_requeue=step)
        return submitit.helpers.DelayedSubmission(nxt)


def _gpus_on_node() -> int:
    import torch

    return torch.cuda.device_count()


def latest_step(job_dir: str) -> int | None:
    """The step of the newest complete checkpoint (sizes checked against its manifest; the ranks verify
    checksums when they resume), or None when there is none yet."""
    from launcher.train.checkpoint import list_checkpoints

    complete = [info.step for info in list_checkpoints(job_dir) if info.complete]
    return max(complete) if complete else None


def submit(job_dir: Path, profile: ClusterProfile, name: str, env: dict[str, str]) -> submitit.Job:
    """sbatch through submitit; logs go to JOB_DIR/slurm/<job id>_<node>_log.{out,err}."""
    if env.get("SLURM_CONF"):
        os.environ["SLURM_CONF"] = env["SLURM_CONF"]  # submitit's sbatch inherits our environment
    executor = submitit.SlurmExecutor(folder=job_dir / "slurm", max_num_timeout=profile.max_requeues,
                                      python=shlex.quote(sys.executable))
    executor.update_parameters(**slurm_parameters(profile, name))
    task = NodeTask(str(job_dir), profile.max_requeues, profile.max_restarts, profile.dist_timeout_s)
    try:
        return executor.submit(task)
    except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError, OSError) as err:
        detail = str(err).strip().splitlines()
        raise LaunchError(f"sbatch refused the job ({detail[-1] if detail else err.__class__.__name__}); "
                          f"check the partition, account and limits.") from None
