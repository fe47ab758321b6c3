"""Submitting a planned job with submitit, and `NodeTask`, the picklable callable srun runs once per node.

Each node's task finds the rendezvous host, checks the allocation against the plan, runs the doctor and then
torchrun under launcher.runtime.node, the supervisor `llaunch run` uses too (signals passed to the ranks,
watchdog, event- and node-ledger records). SLURM signals every process of the step, so a preemption reaches
the ranks twice over (a rank treats every copy as the same request, see launcher.runtime.signals). When the
ranks have saved and exited, the watchdog killed hung ones, or a rank (or another node's task) died without a
sentence (a node failure, launcher.runtime.rank_exits), the first node's task applies cluster.requeue's policy
and, if it says so, hands over to submitit's own checkpoint-and-requeue; the requeued job excludes the
culprit's host where it can spare it (cluster.exclusion). With spare nodes a hang or a node failure first
restarts the job in a new step of its allocation without the culprit's host (cluster.restart), within
--max-restarts. When the first node's task itself dies, the batch script's teardown (cluster.teardown) makes the
same decision for it, through `NodeTask.after_lost_step`.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import submitit

from cluster import job_events, notify
from cluster.doctor.node import NodeReport, preflight
from cluster.jobs import NODE_TASK_SIGNALLED, job_state, parse_scontrol_job
from cluster.exclusion import exclude_from_requeued_job, node_can_be_spared, node_hostnames
from launcher.observe import event_ledger, history
from launcher.observe.node_ledger import NodeEvent, NodeLedger
from cluster.requeue import decide_requeue
from cluster.restart import restart_in_allocation
from cluster.submission import node_command, rendezvous_port
from launcher.config import TrainConfig
from launcher.errors import EXIT_USER_ERROR, LaunchError
from launcher.jobdir.checkpoint_store import list_checkpoints
from launcher.jobdir.layout import JobDir
from launcher.planning.plan import Plan
from launcher.runtime.node import (NodeOutcome, NodeRun, SignalLog, Verdict, record_first_failure,
                                   record_node_ledger, record_outcome, supervise)
from launcher.runtime.rank_exits import judge
from launcher.runtime.watchdog_config import WatchdogConfig

RANK_EXITS_WAIT_S = 15.0  # how long the first node waits for the other nodes' record of their ranks' ends
DOCTOR_REPORT_WAIT_S = 15.0  # ... and for the reports of the nodes that failed the doctor
FINISHED = "training finished"  # what a node task returns when its ranks completed the run


class TrainingError(RuntimeError):
    """The ranks failed (or stopped and may not requeue): the job ends FAILED with this message."""


class StoppedBySignal(TrainingError):
    """A signal from outside (a cancel, SLURM's preemption) ended the attempt: the notify hook heard why already."""


def node_address(node: str) -> str:
    """The address other nodes reach `node` at: SLURM's NodeAddr (equal to the name on most clusters)."""
    result = subprocess.run(["scontrol", "--oneliner", "show", "node", node], capture_output=True, text=True, timeout=30)
    return parse_scontrol_job(result.stdout).get("NodeAddr") or node


def check_allocation(plan: Plan, hosts: list[str], gpus_on_node: int, min_nodes: int | None = None) -> Plan:
    """Refuse to train on an allocation the plan cannot take; return the plan for the nodes the job got (fewer
    than planned with --min-nodes: the same global batch, more accumulation)."""
    if not (min_nodes or plan.nodes) <= len(hosts) <= plan.nodes:
        raise TrainingError(
            f"the job got {len(hosts)} node(s) ({', '.join(hosts)}) but the plan is for {plan.nodes}; resubmit with --nodes {len(hosts)}."
        )
    if plan.device == "cuda" and gpus_on_node < plan.gpus_per_node:
        raise TrainingError(
            f"this node sees {gpus_on_node} GPU(s) but the plan needs {plan.gpus_per_node} per node; "
            f"check --gpus-per-node and the partition."
        )
    return plan.on_nodes(len(hosts))


@dataclass(frozen=True)
class NodeTask(submitit.helpers.Checkpointable):
    """One per node, pickled by submitit; `checkpoint()` hands the next attempt a copy with one more requeue and
    the step it was requeued at (dataclasses.replace: no field is left behind). The node's torchrun runs under
    launcher.runtime.node, as `llaunch run`'s does; this adds SLURM's part: the allocation, the doctor, the
    queue wait in the job's ledger, and the requeue that excludes a culprit's host."""

    job_dir: str
    max_requeues: int
    max_restarts: int
    dist_timeout_s: int
    requeues: int = 0
    step_at_last_requeue: int | None = None
    node_ledger_path: str = ""  # the cluster profile's node ledger (launcher.observe.node_ledger); "": none
    doctor: bool = True
    min_nodes: int | None = None  # the fewest nodes the job may run on (None: all it asked for)
    wrap: tuple[str, ...] = ()  # `apptainer exec ... IMAGE` before torchrun (ContainerJob.wrap); (): none
    python: str = ""  # torchrun's interpreter: the image's under apptainer; "": this task's own
    notify: str = ""  # the shell command run on each change of the job's state (cluster.notify); "": none
    # Restarts inside the allocation on spare nodes (cluster.restart): at most max_step_restarts per allocation
    # (0: no spares), those done, the hosts its steps failed on, the newest checkpoint at the last one.
    max_step_restarts: int = 0
    step_restarts: int = 0
    excluded: tuple[str, ...] = ()
    step_at_last_restart: int | None = None

    def attempt(self, job_id: str) -> str:
        """This attempt's incarnation id in the job's ledger."""
        return job_events.attempt_id(job_id, self.requeues, self.step_restarts)

    def __call__(self) -> str:
        """One attempt on this node; the first node tells the notify hook how it ended."""
        try:
            outcome = self._attempt()
        except StoppedBySignal:
            raise
        except Exception:
            self._notify(submitit.JobEnvironment(), notify.FAILED)
            raise
        if outcome == FINISHED:
            self._notify(submitit.JobEnvironment(), notify.COMPLETED)
        return outcome

    def _notify(self, job_env, state: str) -> None:
        if job_env.global_rank == 0:  # one node speaks for the job, as in its event ledger
            notify.notify(self.notify, self.job_dir, job_env.job_id, state, cwd=os.getcwd())

    def _attempt(self) -> str:
        # Until torchrun ends a stop signal is only recorded (the node runtime passes it on to the ranks); then they
        # are ignored: submitit's handler is called once, in _requeue, when the policy says requeue; left
        # installed, a repeated signal would requeue the job a second time.
        signals = SignalLog().install()
        job_env = submitit.JobEnvironment()
        plan = Plan.load(JobDir(self.job_dir).plan)
        hosts = step_hosts()
        plan = check_allocation(plan, hosts, _gpus_on_node() if plan.device == "cuda" else 0, self.min_nodes)
        restart = f", restart {self.step_restarts} in the allocation" if self.step_restarts else ""
        print(f"[llaunch] attempt {self.requeues + 1}{restart}", file=sys.stderr, flush=True)  # status reads from here
        if job_env.global_rank == 0:  # before the doctor: an attempt that ends there is an incarnation too
            job_events.attempt_started(self.job_dir, job_env.job_id, self.attempt(job_env.job_id), self.requeues + 1,
                                       hosts, restarted=self.step_restarts > 0)
            history.register(self.job_dir)  # the ranks only read the cluster's history
        self._notify(job_env, notify.RESTARTED if self.requeues or self.step_restarts else notify.STARTED)
        report = self._preflight(job_env, hosts, signals) if self.doctor else None
        if report is not None and report.stops_torchrun:
            return self._after_doctor_failure(report, job_env, hosts, signals)
        launch = self._launch(plan, hosts, job_env, report.env if report else {})
        outcome = supervise(launch, signals)
        if job_env.global_rank == 0:
            record_outcome(launch, outcome)
        verdict = record_node_ledger(launch, outcome, self._node_ledger(), job_env.job_id, hosts, RANK_EXITS_WAIT_S)
        return self._after_training(launch, outcome, verdict, job_env, hosts, signals.previous[signal.SIGUSR2])

    def _after_training(self, launch: NodeRun, outcome: NodeOutcome, verdict: Verdict | None, job_env,
                        hosts: list[str], submitit_handler) -> str:
        """How the attempt ends: finished, the job's error, or a requeue after a hang, a node failure or a signal."""
        stop = outcome.stop.name if outcome.stop else None
        if outcome.hang is not None:
            return self._after_hang(verdict, job_env, len(hosts), submitit_handler)
        if outcome.code == 0:
            return FINISHED
        if stop is None and outcome.code == EXIT_USER_ERROR:  # a rank said why in one sentence: the job's, not the node's
            raise TrainingError(f"torchrun exited with code {outcome.code} on {job_env.hostname}; the rank's error is above.")
        if stop is None:
            return self._after_rank_failure(verdict, outcome.code, job_env, hosts, submitit_handler)
        if job_env.global_rank != 0:
            return f"node {job_env.node} stopped by {stop}; the first node decides about the requeue"
        if stop == "SIGTERM" and outcome.code != EXIT_USER_ERROR and job_running(job_env.job_id):
            # not a cancel: srun ended the step because another node's task ended badly; a node failure when
            # that task died (SIGKILL, the OOM killer) without leaving its record, else its own error says why
            died = record_first_failure(launch, self._node_ledger(), job_env.job_id, hosts, task_died=True,
                                        wait_s=RANK_EXITS_WAIT_S)
            if died is not None:
                return self._after_rank_failure(died, outcome.code, job_env, hosts, submitit_handler)
        self._notify(job_env, notify.CANCELLED if stop != "SIGUSR2" and job_is("CANCELLED", job_env.job_id)
                     else notify.PREEMPTED)
        if stop != "SIGUSR2":
            # SIGTERM/SIGUSR1 come from scancel or SLURM preemption: SLURM requeues a preempted job itself.
            raise StoppedBySignal(f"{NODE_TASK_SIGNALLED}{stop} with the newest checkpoint at step "
                                f"{latest_step(self.job_dir)}; a preempted job comes back through SLURM, a cancelled "
                                f"one ends here")
        return self._requeue(submitit_handler, job_env, stop, f"{stop} received")

    def _node_ledger(self) -> NodeLedger | None:
        return NodeLedger(self.node_ledger_path) if self.node_ledger_path else None

    def _preflight(self, job_env, hosts: list[str], signals: SignalLog) -> NodeReport:
        """The doctor's checks of this node against the others, every incarnation before torchrun; its report
        holds the environment the doctor adds. A failure that blames this host goes into the node ledger as a
        hard event (the next submission keeps it out)."""
        report = preflight(Path(self.job_dir), hosts, [node_address(h) for h in hosts], job_env.node,
                           job_env.job_id, rendezvous_port(job_env.job_id), self.attempt(job_env.job_id))
        if report.stops_torchrun and signals.first:  # a cancel's doing, not the nodes'
            self._ended_in_doctor(job_env, signals)
            raise StoppedBySignal(f"{NODE_TASK_SIGNALLED}{signals.first.name} during the doctor's checks, before "
                                  f"torchrun started")
        fault = report.host_fault  # a taken port or a full shared dir is the job's: no node is to blame
        if fault is not None and self.node_ledger_path:
            self._node_ledger().append(NodeEvent(report.host, "doctor", job_id=job_env.job_id,
                                                 detail=f"{fault.name}: {fault.sentence}"))
        return report

    def _after_doctor_failure(self, report: NodeReport, job_env, hosts: list[str], signals: SignalLog) -> str:
        """A node failed the doctor, so no node starts torchrun: what the attempt ends with (a restart in the
        allocation), unless it raises the job's error. With spare nodes, when every failure blames its
        own host (checks.HOST_CHECKS), the first node restarts the job in a new step without those hosts; the
        failing nodes leave the decision to it (their error would end the step before it is made). Otherwise,
        or when no restart is allowed, the job ends FAILED with the failing node's sentence."""
        self._ended_in_doctor(job_env, signals)
        if job_env.global_rank != 0:
            if report.failed and not (self.max_step_restarts and report.host_fault):
                raise TrainingError(report.failure_sentence())
            return f"no torchrun on node {job_env.node}: the doctor failed; the first node decides about a restart"
        peers = self._failed_peers(report, len(hosts)) if self.max_step_restarts else []
        failed = ([report] if report.failed else []) + (peers or [])
        culprits = [r.host for r in failed if r.host_fault]
        if self.max_step_restarts and peers is not None and failed and len(culprits) == len(failed):
            cause = "; ".join(r.failure_sentence().rstrip(".") for r in failed)
            print(f"[llaunch] {cause}", flush=True)
            restarted = restart_in_allocation(self, job_env.job_id, cause, culprits, len(hosts),
                                              latest_step(self.job_dir), job_env.paths.submitted_pickle)
            if restarted:
                return restarted
        if report.failed:
            raise TrainingError(report.failure_sentence())
        if self.max_step_restarts:  # a failing node left the decision, and so the job's error, to this one
            raise TrainingError(failed[0].failure_sentence() if failed else
                                "doctor: another node failed its checks; `llaunch logs JOB --rank R` shows which")
        self._notify(job_env, notify.FAILED)
        return f"no torchrun on node {job_env.node}: another node failed the doctor"

    def _failed_peers(self, report: NodeReport, nodes: int) -> list[NodeReport] | None:
        """The other nodes' failed reports of this attempt (JOB_DIR/doctor/node-N.json, written as their checks
        end), waiting up to DOCTOR_REPORT_WAIT_S for as many as the all-reduce counted; None when some are
        missing (a node whose task or host is gone: nothing says whose fault it is)."""
        deadline = time.monotonic() + DOCTOR_REPORT_WAIT_S
        pending, failed = {n for n in range(nodes) if n != report.node}, []
        while len(failed) < report.peers_failed and pending and time.monotonic() < deadline:
            for node in sorted(pending):
                peer = NodeReport.read(Path(self.job_dir), node)
                if peer is not None and peer.attempt == report.attempt:
                    pending.discard(node)
                    failed += [peer] if peer.failed else []
            time.sleep(0.2)
        return failed if len(failed) == report.peers_failed else None

    def _ended_in_doctor(self, job_env, signals: SignalLog) -> None:
        if job_env.global_rank == 0:
            stop = signals.first.name if signals.first else None
            job_events.attempt_ended(self.job_dir, self.attempt(job_env.job_id), 1, stop, cause=stop or "doctor")

    def _launch(self, plan: Plan, hosts: list[str], job_env, doctor_env: dict[str, str]) -> NodeRun:
        """This node's torchrun for the node runtime: rendezvous on the first node, the collective timeout, what
        the doctor adds; no grace period of its own (SLURM's KillWait ends what a stop signal does not)."""
        argv, extra_env = node_command(
            plan, self.job_dir, rdzv_host=node_address(hosts[0]), rdzv_port=rendezvous_port(job_env.job_id),
            job_id=job_env.job_id, max_restarts=self.max_restarts, dist_timeout_s=self.dist_timeout_s,
            cpus_per_node=len(os.sched_getaffinity(0)), python=self.python or sys.executable, wrap=self.wrap,
        )
        env = {**os.environ, **extra_env, **doctor_env}
        print(f"[llaunch] node {job_env.node}/{len(hosts)} ({job_env.hostname}), attempt {self.requeues + 1}: "
              f"{shlex.join(argv)}", flush=True)
        return NodeRun(Path(self.job_dir), argv, env, self.attempt(job_env.job_id),
                       self._watchdog_config(env), beacon_key=f"{job_env.job_id}-{job_env.node}",
                       node=job_env.node, nodes=len(hosts), grace_s=None)

    def _watchdog_config(self, env: dict[str, str]) -> WatchdogConfig:
        """The variable over the job's config.yaml, into which `llaunch submit` folded the profile's settings."""
        return WatchdogConfig.resolve(env, TrainConfig.load(JobDir(self.job_dir).config).supervision.watchdog)

    def _after_rank_failure(self, verdict: Verdict | None, code: int, job_env, hosts: list[str],
                            submitit_handler) -> str:
        """A rank died without a sentence (killed by the OOM killer, a lost GPU, a crash), or another node's task
        did: a node failure. The first node (whose verdict names the rank that failed first, or the node whose
        task left no record, already in the node ledger) requeues the job within --max-requeues; the loop guard
        stops a crash that recurs before the next checkpoint."""
        if job_env.global_rank != 0:
            return f"node {job_env.node}: torchrun exited with code {code}; the first node decides about the requeue"
        cause = verdict.why if verdict else f"a rank failed (torchrun exited with code {code})"
        print(f"[llaunch] {cause}", flush=True)
        return self._recover(submitit_handler, job_env, "a node failure", cause,
                             exclude=verdict.host if verdict else None, nodes=len(hosts))

    def after_lost_step(self, submitit_handler, job_env, hosts: list[str], code: int, submitted_pickle: Path) -> str:
        """From the batch script (cluster.teardown), when the step ended with this attempt undecided: its first
        node's task died (SIGKILL, the OOM killer), or the whole step was killed. The attempt ends in the job's
        ledger as killed; the node whose task left no record of its ranks is blamed (none when every task was
        killed); the job is requeued as after any node failure, so --max-requeues and the loop guard hold. The batch
        script has no SUBMITIT_FOLDER: it names the attempt's `submitted_pickle`, where a restart writes the next."""
        job_events.attempt_ended(self.job_dir, self.attempt(job_env.job_id), code, None, cause=event_ledger.KILLED)
        found = judge(self.job_dir, self.attempt(job_env.job_id), hosts, task_died=True,
                      wait_s=0.0)  # the step is over: every record there will be is there
        if found is not None and self.node_ledger_path:
            self._node_ledger().append(NodeEvent(found[0], "rank_failed", job_id=job_env.job_id, detail=found[1]))
        cause = found[1] if found else f"every node task of the step was killed (srun exited with code {code})"
        print(f"[llaunch] {cause}", flush=True)
        return self._recover(submitit_handler, job_env, "a node failure", cause, exclude=found[0] if found else None,
                             nodes=len(hosts), submitted_pickle=submitted_pickle)

    def _after_hang(self, verdict: Verdict, job_env, nodes: int, submitit_handler) -> str:
        """Report the hang; the first node (which put its culprit into the node ledger) requeues the job without
        the culprit's host where it can."""
        print(f"[llaunch] {verdict.why}", flush=True)
        self._notify(job_env, notify.HANG)
        if job_env.global_rank != 0:
            return f"node {job_env.node}: {verdict.why}; the first node decides about the requeue"
        return self._recover(submitit_handler, job_env, "a hang", f"hang on {verdict.host or 'no single node'}",
                             exclude=verdict.host, nodes=nodes)

    def _recover(self, submitit_handler, job_env, stopped_by: str, cause: str, exclude: str | None,
                 nodes: int, submitted_pickle: Path | None = None) -> str:
        """After a hang or a node failure on `nodes` nodes: a new step on the allocation's healthy nodes while
        its spares and --max-restarts allow (cluster.restart), else the requeue without `exclude`'s host."""
        if self.max_step_restarts:
            restarted = restart_in_allocation(self, job_env.job_id, cause, [exclude] if exclude else [], nodes,
                                              latest_step(self.job_dir),
                                              submitted_pickle or job_env.paths.submitted_pickle)
            if restarted:
                return restarted
        return self._requeue(submitit_handler, job_env, stopped_by, cause, exclude=exclude,
                             min_nodes=self.min_nodes or nodes)

    def _requeue(self, submitit_handler, job_env, stopped_by: str, cause: str, exclude: str | None = None,
                 min_nodes: int = 1) -> str:
        """Apply cluster.requeue's policy; to requeue, hand over to submitit's checkpoint-and-requeue, then keep
        the host `exclude` out of the requeued job if it can still get `min_nodes` nodes without it."""
        decision = decide_requeue(cause=cause, requeues_done=self.requeues, max_requeues=self.max_requeues,
                                  step=latest_step(self.job_dir), step_at_last_requeue=self.step_at_last_requeue)
        print(f"[llaunch] {'requeue' if decision.requeue else 'no requeue'}: {decision.reason}", flush=True)
        if not decision.requeue:
            raise TrainingError(f"job stopped by {stopped_by} and not requeued: {decision.reason}")
        job_events.requeued(self.job_dir, self.attempt(job_env.job_id), decision.reason)
        try:
            submitit_handler(signal.SIGUSR2, None)  # self.checkpoint(), scontrol requeue, exit
        except SystemExit:  # requeued: pending now, though SLURM still ends this attempt
            if exclude and node_can_be_spared(exclude, job_env.job_id, min_nodes):
                exclude_from_requeued_job(job_env.job_id, [exclude])
            self._notify(job_env, notify.REQUEUED)
            raise
        return "requeued"

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """The next attempt: this task with one more requeue, remembering the step it restarts from; a new
        allocation, so none of its restarts done and no host excluded yet (the requeued job's ExcNodeList has them)."""
        return submitit.helpers.DelayedSubmission(
            dataclasses.replace(self, requeues=self.requeues + 1, step_at_last_requeue=latest_step(self.job_dir),
                                step_restarts=0, excluded=(), step_at_last_restart=None))


def step_hosts() -> list[str]:
    """The hosts of this srun step (with spare nodes, fewer than the allocation's)."""
    return node_hostnames(os.environ.get("SLURM_STEP_NODELIST") or os.environ["SLURM_JOB_NODELIST"])


def job_running(job_id: str) -> bool:
    """Whether SLURM still runs the job (a cancelled, timed-out or preempted one is not)."""
    return job_is("RUNNING", job_id)


def job_is(state: str, job_id: str) -> bool:
    """Whether scontrol says the job is in `state` (False when it cannot say)."""
    try:
        return job_state(job_id, dict(os.environ)).state == state
    except (LaunchError, OSError, subprocess.SubprocessError):
        return False


def _gpus_on_node() -> int:
    import torch

    return torch.cuda.device_count()


def latest_step(job_dir: str) -> int | None:
    """The step of the newest complete checkpoint (sizes checked against its manifest; the ranks verify
    checksums when they resume), or None when there is none yet."""
    complete = [info.step for info in list_checkpoints(job_dir) if info.complete]
    return max(complete) if complete else None
