"""The torchrun command for one node of a job: pure (argv, env), so `--dry-run`, SLURM and tests share it; the
process that runs it is launcher.runtime.node's supervisor.

`python -m launcher.runtime.torchrun ARGS` is torchrun itself (same arguments, same agent) with these differences: a
rank that already said why it stopped (a LaunchError's sentence and exit 2, a preemption's checkpoint and
exit 75) ends the launch with that code, without torchrun's ChildFailedError traceback burying the sentence;
a rank that crashed ends it with one sentence naming the rank that failed first and how (exit 1); a signal
that stops torchrun itself (those of TORCHRUN_SIGNALS) is one line and exit 128 + signal, not its
SignalException traceback. torchrun handles neither SIGTERM nor SIGUSR1/2 (the supervisor starts it with the
stop signals ignored and passes them to the ranks itself): it would kill the ranks 30 s after a SIGTERM, in the
middle of their checkpoint, and die of SIGUSR1/2. The agent and its ranks end with the process that started them (launcher.env.SUPERVISOR_PID).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from launcher.env import SUPERVISOR_PID
from launcher.errors import EXIT_USER_ERROR, RANK_FAILED_EXIT_CODE, REQUEUE_EXIT_CODE, LaunchError
from launcher.planning.plan import Plan
from launcher.runtime.signals import die_with_supervisor
from launcher.runtime.terminal import outlive_the_terminal

ENTRYPOINT = "launcher.train"
TORCHRUN_MODULE = "launcher.runtime.torchrun"
# The first line each worker prints: on SLURM the rendezvous, not the node order, decides which node runs
# which ranks, so `llaunch logs --rank R` finds R's node by this line.
RANK_STARTS = "[llaunch] rank {rank} of {world} starts"
# What torchrun's agent itself answers (Ctrl-C, and a signal sent to the agent alone): never SIGTERM.
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"


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
    argv = [python, "-m", TORCHRUN_MODULE, "--signals-to-handle", TORCHRUN_SIGNALS]
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


EXPLAINED_EXIT_CODES = (EXIT_USER_ERROR, REQUEUE_EXIT_CODE)


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
    outlive_the_terminal()  # before torch's logging handlers take sys.stderr
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
