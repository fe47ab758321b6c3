"""What the batch script runs after srun when the step failed: the decision no node task made.

The first node's task decides how an attempt ends (cluster.executor): finished, the job's error, or a requeue
after a signal, a hang or a node failure. When that task itself dies without a word (the OOM killer,
SIGKILL, `scancel --signal=KILL JOB.0` of the whole step), srun ends the step (--kill-on-bad-exit) and no
task is left to decide: the job would fail although a checkpoint exists. submitit's sbatch script runs its
`teardown` lines after srun, on the batch host and still inside the allocation (submitit.slurm.slurm.
_make_sbatch_string); cluster.submission.teardown_lines hands a failed step's status to this module.

The requeue count stays where it lives, in the attempt's pickled NodeTask (FOLDER/JOB_submitted.pkl): this
module loads it and requeues through submitit's own checkpoint-and-requeue handler, exactly as the node task
does, so the next attempt's task carries one more requeue and the step it restarts from, and --max-requeues
and the loop guard (cluster.requeue) count this requeue like any other. It acts only on an attempt its first
node's task left undecided (launched, but neither ended nor requeued in the job's ledger, and no result
submitit wrote for task 0) of a job SLURM still runs: after a cancel or a requeue the batch script is ended
with the job and never gets here.

With spare nodes (`--next-step`, cluster.submission.restart_lines) it runs after every step and also says
whether the job goes on in a new step of its allocation (cluster.restart): it prints that step's srun node
choice and exits 0; its own messages go to stderr then, as its stdout is the script's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import submitit
from submitit.core.job_environment import SignalHandler
from submitit.core.utils import DelayedSubmission, JobPaths

from cluster import job_events
from cluster.exclusion import node_hostnames
from cluster.executor import NodeTask, TrainingError, job_running
from cluster.restart import next_step_nodes
from launcher.errors import NO_NEW_STEP_EXIT_CODE


def decide(folder: str, code: int) -> str:
    """What happened to the failed step's job, in a sentence (a requeue leaves through SystemExit)."""
    job_env = submitit.JobEnvironment()
    paths = JobPaths(folder, job_id=job_env.job_id, task_id=0)
    delayed = DelayedSubmission.load(paths.submitted_pickle)
    task = delayed.function
    if code == 0 or not isinstance(task, NodeTask) or paths.result_pickle.exists() \
            or not job_events.attempt_undecided(task.job_dir, task.attempt(job_env.job_id)):
        return "the first node's task decided about this attempt"
    if not job_running(job_env.job_id):
        return "the job is no longer running"
    # `scontrol requeue` ends this script with SIGTERM: the host's exclusion that follows it must still happen.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    handler = SignalHandler(job_env, paths, delayed).checkpoint_and_try_requeue
    hosts = job_events.attempt_hosts(task.job_dir, task.attempt(job_env.job_id)) \
        or node_hostnames(os.environ["SLURM_JOB_NODELIST"])
    return task.after_lost_step(handler, job_env, hosts, code, paths.submitted_pickle)


def _decide_and_say(folder: str, status: int) -> None:
    try:
        print(f"[llaunch] after the step: {decide(folder, status)}", flush=True)
    except TrainingError as err:
        print(f"llaunch: error: {err}", file=sys.stderr, flush=True)
    except subprocess.CalledProcessError as err:  # scontrol refused the requeue (the job was cancelled meanwhile)
        print(f"llaunch: error: the requeue failed ({err}); the job ends here.", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m cluster.teardown [--next-step] FOLDER STATUS`; exits with the step's STATUS unless the job was
    requeued. With --next-step: exits 0 after printing the next step's srun node choice when the job restarts
    inside its allocation, else NO_NEW_STEP_EXIT_CODE."""
    argv = list(argv if argv is not None else sys.argv[1:])
    next_step = argv[:1] == ["--next-step"]
    folder, status = argv[1:] if next_step else argv
    if not next_step:
        _decide_and_say(folder, int(status))
        return int(status)
    with contextlib.redirect_stdout(sys.stderr):
        _decide_and_say(folder, int(status))
        nodes = next_step_nodes(folder, submitit.JobEnvironment().job_id)
    if nodes is None:
        return NO_NEW_STEP_EXIT_CODE
    print(" ".join(nodes), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
