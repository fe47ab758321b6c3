"""The torchrun command for one node of a job: pure (argv, env), so `--dry-run`, SLURM and tests share it.

`python -m launcher.runtime.torchrun ARGS` is torchrun itself (same arguments, same agent) with these differences: a
rank that already said why it stopped (a LaunchError's sentence and exit 2, a preemption's checkpoint and
exit 75) ends the launch with that code, without torchrun's ChildFailedError traceback burying the sentence;
a rank that crashed ends it with one sentence naming the rank that failed first and how (exit 1); a signal
that stops torchrun itself (SIGTERM, SIGINT, SIGHUP, SIGQUIT) is one line and exit 128 + signal, not its
SignalException traceback. The agent and its ranks end with the process that started them (launcher.env.SUPERVISOR_PID).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from launcher.env import SUPERVISOR_PID
from launcher.errors import EXIT_USER_ERROR, LaunchError
from launcher.planning.plan import Plan
from launcher.runtime.signals import (HANG_EXIT_CODE, REQUEUE_EXIT_CODE, STOP_SIGNALS, die_with_supervisor,
                              signal_ranks)

ENTRYPOINT = "launcher.train"
TORCHRUN_MODULE = "launcher.runtime.torchrun"
# The first line each worker prints: on SLURM the rendezvous, not the node order, decides which node runs
# which ranks, so `llaunch logs --rank R` finds R's node by this line.
RANK_STARTS = "[llaunch] rank {rank} of {world} starts"


def build_torchrun_argv(
    plan: Plan,
    job_dir: str | Path,
    *,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    max_restarts: int = 0,
    python: str = "python",
    cpus_per_node: int | None = None,
) -> tuple[list[str], dict[str, str]]:
    """argv and the environment variables to add. One node: --standalone; several: c10d rendezvous."""
    argv = [python, "-m", TORCHRUN_MODULE]
    if nnodes == 1 and rdzv_endpoint is None:
        argv.append("--standalone")
    else:
        if not rdzv_endpoint:
            raise LaunchError(f"{nnodes} nodes need a rendezvous endpoint (host:port of the first node).")
        argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id or "llaunch"]
    argv += [
        "--nnodes", str(nnodes),
        "--nproc-per-node", str(plan.gpus_per_node),
        "--max-restarts", str(max_restarts),
        "-m", ENTRYPOINT, "--job-dir", str(job_dir),
    ]
    env = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if cpus_per_node:
        # torchrun would set 1 thread per rank; give each rank its share of the node's cores instead.
        env["OMP_NUM_THREADS"] = str(max(1, cpus_per_node // plan.gpus_per_node))
    if plan.device == "cpu":
        # ZeRO needs it; every other strategy too, because transformers imports an installed DeepSpeed,
        # whose auto-detection then warns on every rank that it found no GPU.
        env["DS_ACCELERATOR"] = "cpu"
    else:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # less fragmentation with varying shapes
    return argv, env


def run_torchrun(argv: list[str], env: dict[str, str], grace_s: float = 30.0, watchdog=None) -> int:
    """Run torchrun in its own process group and forward SIGINT, SIGTERM, SIGHUP, SIGQUIT (and SIGUSR1/2 to the
    ranks) to it.

    torchrun passes the signal on to its workers and waits for them; a second signal (or a torchrun that
    outlives `grace_s`) kills the whole group. torchrun and its ranks end with this process however it ends
    (launcher.env.SUPERVISOR_PID, launcher.runtime.signals.die_with_supervisor). Returns torchrun's exit code, 128 + SIGINT after
    Ctrl-C, or REQUEUE_EXIT_CODE after a preemption signal (the ranks saved a checkpoint). With a launcher.runtime.watchdog
    Watchdog, a hang is dumped and the group killed: HANG_EXIT_CODE.
    """
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(argv, env={**env, SUPERVISOR_PID.name: str(os.getpid())}, start_new_session=True)
    received: list[int] = []
    signalled_at: list[float] = []

    def forward(signum, _frame):
        received.append(signum)
        signalled_at.append(time.monotonic())
        if len(received) == 1 and signum in (signal.SIGUSR1, signal.SIGUSR2):
            signal_ranks(proc.pid, signum)  # torchrun would die of these; the ranks save and exit
            return
        target, sig = (proc.pid, signum) if len(received) == 1 else (-proc.pid, signal.SIGKILL)
        try:
            os.kill(target, sig)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, *STOP_SIGNALS)}
    try:
        code, hang = _wait_for_torchrun(proc, signalled_at, grace_s, watchdog)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:  # no orphans: torchrun's group dies, and its ranks with it (die_with_supervisor)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if hang is not None:
        print(f"llaunch: {watchdog.describe(hang)}; the ranks were killed", file=sys.stderr)
        return HANG_EXIT_CODE
    if received:  # a preemption signal made the ranks checkpoint: ask to be requeued; Ctrl-C is a stop
        return 128 + received[0] if received[0] == signal.SIGINT else REQUEUE_EXIT_CODE
    return code if code >= 0 else 128 - code


def _wait_for_torchrun(proc, signalled_at: list[float], grace_s: float, watchdog) -> tuple[int, object]:
    """torchrun's exit code, and the hang the watchdog found (None without one). After a stop signal the ranks
    get `grace_s` to save and exit, then the group is killed; a hang kills it at once.

    The wait never blocks unbounded: a signal handled during it does not end the wait, so only polling
    notices that the grace period has run out (a torchrun that ignores SIGINT, as a process started in the
    background of a script without job control does, would otherwise be waited on forever)."""
    import os
    import signal
    import subprocess
    import time

    poll_s = watchdog.config.poll_s if watchdog else min(1.0, grace_s)
    while True:
        try:
            return proc.wait(timeout=poll_s), None
        except subprocess.TimeoutExpired:
            if signalled_at:
                if time.monotonic() - signalled_at[0] >= grace_s:
                    os.killpg(proc.pid, signal.SIGKILL)
            elif watchdog is not None and (hang := watchdog.check()) is not None:
                watchdog.kill_ranks(proc.pid)  # torchrun starts each rank in a session of its own
                os.killpg(proc.pid, signal.SIGKILL)
                return proc.wait(), hang


EXPLAINED_EXIT_CODES = (EXIT_USER_ERROR, REQUEUE_EXIT_CODE)
# A rank that crashed (any other exit code, or a signal) ends the launch with this: not a user error (2), not a
# preemption (75) nor a hang (124), and not 128 + N, which says the launcher itself was signalled.
RANK_FAILED_EXIT_CODE = 1


class _DropWorkerFailures(logging.Filter):
    """torchrun's agent logs "failed (exitcode: N) local_rank: ..." for every non-zero rank exit; main() says
    which rank failed first, in one sentence."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "(exitcode: " not in record.getMessage()


def _say_rank_failed(rank: int, exitcode: int) -> None:
    import signal

    how = f"exited with code {exitcode}"
    if exitcode < 0:
        known = -exitcode in signal.valid_signals()
        how = f"was killed by {signal.Signals(-exitcode).name if known else f'signal {-exitcode}'}"
    print(f"llaunch: rank {rank} failed first: it {how}; its error is in the output above, the other ranks were "
          f"stopped.", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import os

    die_with_supervisor()  # before torch is imported: `llaunch run` may be gone already
    os.environ[SUPERVISOR_PID.name] = str(os.getpid())  # this agent's own; its ranks inherit it and end with it
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DropWorkerFailures())
    try:
        torchrun_main(argv)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()  # torchrun's earliest; on a tie, the first it saw
        if failure.exitcode in EXPLAINED_EXIT_CODES:
            return failure.exitcode
        _say_rank_failed(rank, failure.exitcode)
        return RANK_FAILED_EXIT_CODE
    except SignalException as err:  # SIGTERM / SIGINT: the agent already passed it on to the ranks and waited
        print(f"llaunch: stopped by {err.sigval.name}", file=sys.stderr)
        return 128 + err.sigval
    return 0


if __name__ == "__main__":
    sys.exit(main())
