"""The node runtime, torch-free: the one supervisor of torchrun on a node, for `llaunch run` (launcher.cli.run)
and for each node task of a SLURM job (cluster.executor.NodeTask), so both start, watch, stop and record a
launch the same way.

- The command: launcher.runtime.torchrun.build_torchrun_argv (a SLURM node adds its rendezvous and collective
  timeout, cluster.submission.node_command); torchrun starts with the stop signals ignored.
- The ranks' environment contract (rank_env, variables of launcher.env): SUPERVISOR_PID (torchrun's agent and the ranks end with this
  process), INCARNATION (the lane of their events), BEACON_DIR (where the watchdog reads).
- The watchdog (launcher.runtime.watchdog), polled while no stop signal came: a hang kills the ranks (exit 124).
- The signal policy (SignalLog, _forward): SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 are recorded and passed
  to each rank once the rank handles them, so one that came while the ranks were starting is not lost; Ctrl-C
  (SIGINT) goes to torchrun's agent. With `grace_s` (`llaunch run`) a second signal, or a stop that outlives
  grace_s, kills the whole group; without it (SLURM) the scheduler's KillWait does.
- The event ledger: the launch and exit events (record_launch, record_exit; the watchdog adds the hang).
- The node ledger (record_node_ledger): this node's stragglers (from their beacons), and on the first node the
  hang's culprit and the rank that failed first (launcher.runtime.rank_exits).

What is SLURM's (the queue wait, the doctor, the requeue, excluding a host) stays in cluster/, on top of the
NodeOutcome this returns.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from launcher.env import BEACON_DIR, INCARNATION, SUPERVISOR_PID
from launcher.errors import EXIT_USER_ERROR, HANG_EXIT_CODE, REQUEUE_EXIT_CODE
from launcher.observe import event_ledger
from launcher.observe.node_ledger import NodeEvent, NodeLedger
from launcher.runtime.rank_exits import RankWatch, judge
from launcher.runtime.signals import STOP_SIGNALS, catches, ignore_stop_signals, ranks_of, send_signal
from launcher.runtime.watchdog import Watchdog, WatchdogConfig, describe, hang_culprit, kill_ranks

POLL_S = 0.2  # how often the supervisor looks at torchrun, its ranks and the signals it got (the watchdog: poll_s)
HANG_CAUSE = "hang"  # an exit event's cause when the watchdog killed the ranks


def node_name() -> str:
    """This node's name in the ledgers: SLURM's (what --exclude takes; two slurmd on one host differ by it), else
    the host's."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


@dataclass(frozen=True)
class NodeRun:
    """One node's launch: what to run and how to supervise it."""

    job_dir: Path
    argv: list[str]
    env: dict[str, str]  # torchrun's environment before the contract: the caller's and the command's own
    incarnation: str  # the launch's id in the event ledger (rank_exits' records are kept under it too)
    watchdog: WatchdogConfig
    beacon_key: str  # names this launch's beacon folder (`run`; the SLURM job id and node): beacon.beacon_folder
    host: str = field(default_factory=node_name)
    node: int = 0  # this node's index in the job: the first node alone judges the job's hang or failure
    nodes: int = 1
    grace_s: float | None = 30.0  # after a stop signal, before the group is killed; None: the scheduler kills


@dataclass(frozen=True)
class NodeOutcome:
    code: int  # torchrun's exit code (128 + N when signal N ended it); HANG_EXIT_CODE after a hang
    stop: signal.Signals | None  # the first stop signal this process received
    hang: Path | None  # the hangs/ folder of a hang this node saw or was asked to dump for
    stragglers: dict[int, int]  # this node's ranks the straggler score flagged last, each with the step that did
    grace_s: float  # the watchdog's grace: how long another node may still be writing the hang's evidence

    @property
    def rank_failed(self) -> bool:
        """A rank ended the launch without a sentence (a crash, the OOM killer): no signal, no hang, no user error."""
        return self.stop is None and self.hang is None and self.code not in (0, EXIT_USER_ERROR)

    def launcher_code(self) -> int:
        """What `llaunch run` exits with: the hang code, 128 + SIGINT after Ctrl-C, REQUEUE_EXIT_CODE after another
        stop signal (the ranks saved and ask to be rerun), else torchrun's code."""
        if self.hang is not None:
            return HANG_EXIT_CODE
        if self.stop is not None:
            return 128 + self.stop if self.stop == signal.SIGINT else REQUEUE_EXIT_CODE
        return self.code


@dataclass(frozen=True)
class Verdict:
    """What the node ledger was told about a launch that ended badly, for the log and the requeue."""

    why: str
    host: str | None  # the host to blame (None: no single one)


class SignalLog:
    """The stop signals (and Ctrl-C) this process received, in order. Installed before anything starts (a SLURM
    node records them during the doctor's checks too); `previous` keeps the handlers it replaced."""

    SIGNALS = (signal.SIGINT, *STOP_SIGNALS)

    def __init__(self):
        self.received: list[signal.Signals] = []
        self.first_at: float | None = None
        self.previous: dict = {}

    def install(self) -> "SignalLog":
        self.previous = {sig: signal.signal(sig, self._record) for sig in self.SIGNALS}
        return self

    def _record(self, signum, _frame) -> None:
        self.received.append(signal.Signals(signum))  # nothing else: the supervisor's poll loop acts on it
        self.first_at = self.first_at or time.monotonic()

    @property
    def first(self) -> signal.Signals | None:
        return self.received[0] if self.received else None

    def overdue(self, grace_s: float | None) -> bool:
        """A second signal came, or the first one `grace_s` ago: time to kill (never without a grace)."""
        return grace_s is not None and self.first_at is not None and (
            len(self.received) > 1 or time.monotonic() - self.first_at >= grace_s)

    def settle(self) -> None:
        """torchrun has ended: the stop signals stay ignored (a late copy must neither kill a process that ends
        cleanly nor run a handler installed before this one), Ctrl-C gets its handler back."""
        ignore_stop_signals()
        signal.signal(signal.SIGINT, self.previous.get(signal.SIGINT, signal.default_int_handler))


def rank_env(incarnation: str, watchdog: Watchdog | None) -> dict[str, str]:
    """The ranks' environment contract, set by the supervisor for torchrun and its ranks."""
    env = {SUPERVISOR_PID.name: str(os.getpid()), INCARNATION.name: incarnation}
    return {**env, BEACON_DIR.name: str(watchdog.folder)} if watchdog else env


def supervise(run: NodeRun, signals: SignalLog) -> NodeOutcome:
    """Run torchrun to its end under the signal policy and the watchdog; no process it started outlives it."""
    watchdog = Watchdog.create(run.job_dir, run.beacon_key, run.watchdog, host=run.host, nodes=run.nodes,
                               incarnation=run.incarnation)
    ranks = RankWatch(run.host, run.node)
    proc = subprocess.Popen(run.argv, env={**run.env, **rank_env(run.incarnation, watchdog)},
                            start_new_session=True, preexec_fn=ignore_stop_signals)
    try:
        hang = _watch(proc, run, signals, watchdog, ranks)
    finally:
        signals.settle()
        _kill_group(proc.pid)  # torchrun's group; the ranks end with their agent (die_with_supervisor)
    code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    if code != 0:
        ranks.save(run.job_dir, run.incarnation)
    if watchdog is None:
        return NodeOutcome(code, signals.first, None, {}, 0.0)
    try:
        if hang is None and code != 0:  # ranks that died because another node's watchdog killed its own
            hang = watchdog.requested_dump()
        stragglers = watchdog.stragglers()
    finally:
        watchdog.close()
    return NodeOutcome(HANG_EXIT_CODE if hang else code, signals.first, hang, stragglers, watchdog.config.grace_s)


def _watch(proc: subprocess.Popen, run: NodeRun, signals: SignalLog, watchdog: Watchdog | None,
           ranks: RankWatch) -> Path | None:
    """Poll until torchrun ends; returns the hang the watchdog found (None without one)."""
    forwarded: set[tuple[int, int]] = set()
    hang = None
    while proc.poll() is None:
        ranks.poll(proc.pid)
        _forward(proc.pid, signals, forwarded)
        if signals.overdue(run.grace_s):
            _kill_group(proc.pid)
        elif watchdog is not None and hang is None and not signals.received:
            hang = watchdog.check()
            if hang is not None:
                kill_ranks(proc.pid)  # torchrun starts each rank in a session of its own
                _kill_group(proc.pid)
        time.sleep(POLL_S)
    return hang


def _forward(torchrun_pid: int, signals: SignalLog, forwarded: set[tuple[int, int]]) -> None:
    """Each received signal once to whom it is for: SIGINT to torchrun's agent, a stop signal to each rank that
    handles it by now. `forwarded` remembers (pid, signal) across calls."""
    for signum in dict.fromkeys(signals.received):
        targets = [torchrun_pid] if signum == signal.SIGINT else \
            [rank.pid for rank in ranks_of(torchrun_pid) if catches(rank.pid, signum)]
        for pid in targets:
            if (pid, signum) not in forwarded:
                forwarded.add((pid, signum))
                send_signal(pid, signum)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ----- what the launch leaves in the ledgers ---------------------------------------------------------------
def record_launch(job_dir, incarnation: str, nodes: int, how: str, **facts) -> None:
    """The event that opens an incarnation's lane; `facts`: its start `t`, SLURM's queue wait, ..."""
    event_ledger.append(job_dir, event_ledger.LAUNCH, inc=incarnation, nodes=nodes, how=how, **facts)


def record_exit(job_dir, incarnation: str, code: int, stop: str | None, cause: str | None = None) -> None:
    """The event that closes it; `cause`: what ended it when neither the code nor a signal says (a hang)."""
    cause = cause or (event_ledger.exit_cause(code) if code == 0 or stop is None else stop)
    event_ledger.append(job_dir, event_ledger.EXIT, inc=incarnation, code=code, cause=cause, signal=stop)


def record_outcome(run: NodeRun, outcome: NodeOutcome, code: int | None = None) -> None:
    """The exit event of `outcome` (with `code` when the launcher exits with another one)."""
    record_exit(run.job_dir, run.incarnation, outcome.code if code is None else code,
                outcome.stop.name if outcome.stop else None, HANG_CAUSE if outcome.hang else None)


def record_node_ledger(run: NodeRun, outcome: NodeOutcome, ledger: NodeLedger | None, job_id: str = "",
                       hosts: list[str] | None = None, wait_s: float = 0.0) -> Verdict | None:
    """Every node records its stragglers; the first node alone (one event per hang or failure) the hang's
    culprit or the rank that failed first, over `hosts` (default: this node), waiting up to `wait_s` for the
    other nodes' records. Returns what was found (None: the launch did not end in a hang or a failure)."""
    if outcome.stragglers and ledger is not None:
        ledger.append(NodeEvent(run.host, "straggler", job_id=job_id, detail=f"rank(s) {sorted(outcome.stragglers)} "
                                f"flagged at step {max(outcome.stragglers.values())}"))
    if outcome.hang is not None:
        if run.node != 0:
            return Verdict(describe(outcome.hang), None)
        found = hang_culprit(outcome.hang, wait_s=outcome.grace_s + 5)  # another node may still write it
        if found is not None and ledger is not None:
            ledger.append(NodeEvent(found[0], "hang", job_id=job_id, detail=found[1]))
        return Verdict(describe(outcome.hang), found[0] if found else None)
    if outcome.rank_failed and run.node == 0:
        found = record_first_failure(run, ledger, job_id, hosts or [run.host], task_died=False, wait_s=wait_s)
        return found or Verdict(f"a rank failed (torchrun exited with code {outcome.code})", None)
    return None


def record_first_failure(run: NodeRun, ledger: NodeLedger | None, job_id: str, hosts: list[str], task_died: bool,
                         wait_s: float) -> Verdict | None:
    """The rank that failed first (or, `task_died`, the node whose task died), from every node's record of the
    launch; its host goes into the node ledger. None when nothing singles one out."""
    found = judge(run.job_dir, run.incarnation, hosts, task_died, wait_s)
    if found is None:
        return None
    if ledger is not None:
        ledger.append(NodeEvent(found[0], "rank_failed", job_id=job_id, detail=found[1]))
    return Verdict(found[1], found[0])
