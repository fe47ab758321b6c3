"""The job's notify hook: `llaunch submit --notify CMD` (or a cluster profile's `notify:`) runs CMD through the shell
on each change of the job's state, so its owner knows without watching.

`llaunch submit` runs it once the job is submitted; afterwards the first node's task (cluster.executor.NodeTask)
runs it, in the job's frozen code folder, as the job starts (`started`, `restarted` after a requeue), is stopped by a
signal (`preempted`; `cancelled` when SLURM says so), `requeued`, `hang`s, `failed` or `completed`. CMD finds
LLAUNCH_JOB_ID, LLAUNCH_JOB_STATE, LLAUNCH_JOB_STEP, LLAUNCH_JOB_LOSS and LLAUNCH_JOB_DIR in its environment
(launcher.env). A hook never harms the job: it runs at most HOOK_TIMEOUT_S (then its process group is killed), its
exit and output go to JOB_DIR/notify.jsonl and nowhere else, and nothing it does (fail, hang, not exist) is raised.
It runs synchronously, so the states reach it in order; the time box keeps a preempted job's requeue well inside
SLURM's warning (signal_delay_s).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from launcher.env import JOB_DIR, JOB_ID, JOB_LOSS, JOB_STATE, JOB_STEP
from launcher.errors import LaunchError
from launcher.jobdir.layout import JobDir
from launcher.observe.metrics_file import last_metrics

SUBMITTED, STARTED, PREEMPTED, REQUEUED, RESTARTED, HANG, FAILED, COMPLETED, CANCELLED = (
    "submitted", "started", "preempted", "requeued", "restarted", "hang", "failed", "completed", "cancelled")
STATES = (SUBMITTED, STARTED, PREEMPTED, REQUEUED, RESTARTED, HANG, FAILED, COMPLETED, CANCELLED)
HOOK_TIMEOUT_S = 10.0
OUTPUT_KEPT = 2000  # characters of the hook's output kept in the log (its end)


def hook_env(job_id: str, state: str, job_dir: str, metrics: dict | None) -> dict[str, str]:
    """The variables the hook reads: the newest logged step and its loss, empty before the first."""
    if state not in STATES:
        raise ValueError(f"unknown job state {state!r}")
    step, loss = (metrics.get("step"), metrics.get("loss")) if metrics else (None, None)
    return {JOB_ID.name: str(job_id), JOB_STATE.name: state, JOB_DIR.name: str(job_dir),
            JOB_STEP.name: "" if step is None else str(step), JOB_LOSS.name: "" if loss is None else f"{float(loss):.6g}"}


def run_hook(command: str, env: dict[str, str], cwd: str | None, timeout_s: float) -> dict:
    """Run `command` in the shell, in a session of its own (so a timeout ends everything it started); what
    happened, as the log records it. Never raises."""
    start = time.monotonic()
    try:
        proc = subprocess.Popen(command, shell=True, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as err:
        return {"code": None, "error": f"cannot start the hook: {err.strerror or err}", "seconds": 0.0}
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:  # a process that left the session may still hold the pipe: stop reading after a moment
            output, _ = proc.communicate(timeout=2)
        except subprocess.TimeoutExpired:
            output = b""
    record = {"code": proc.returncode, "seconds": round(time.monotonic() - start, 3),
              "output": output.decode("utf-8", "replace")[-OUTPUT_KEPT:]}
    if timed_out:
        record["error"] = f"killed after {timeout_s:g} s"
    return record


def notify(command: str, job_dir: str, job_id: str, state: str, cwd: str | None = None,
           timeout_s: float = HOOK_TIMEOUT_S) -> None:
    """Run the job's hook for `state` (nothing without one) and log it in JOB_DIR/notify.jsonl."""
    if not command:
        return
    try:
        metrics = last_metrics(job_dir)
    except (OSError, ValueError, LaunchError):  # a metrics file that cannot be read: the hook runs without
        metrics = None
    env = {**os.environ, **hook_env(job_id, state, job_dir, metrics)}
    record = {"t": time.time(), "state": state, "job_id": str(job_id), **run_hook(command, env, cwd, timeout_s)}
    try:
        with open(JobDir(job_dir).notify_log, "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")
    except OSError:
        pass  # the hook's log is the job's least important file: a full disk must not end the job here
