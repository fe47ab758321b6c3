"""What the node task adds to the job's event ledger (launcher.observe.event_ledger): each attempt's start with SLURM's
queue wait (none for a restart inside the allocation) and the hosts of its step, its end (both through
launcher.runtime.node, as `llaunch run`'s), and its requeue or restart. Only the first node's
task writes (or, when that task was killed before it could, cluster.teardown), so each event is there once."""

from __future__ import annotations

import datetime
import shutil
import subprocess

from cluster.jobs import parse_scontrol_job
from launcher.observe import event_ledger
from launcher.runtime.node import record_exit, record_launch


def attempt_id(job_id: str, requeues: int, restarts: int = 0) -> str:
    """The incarnation id of one attempt of a SLURM job: its id, how often it was requeued before and, after a
    restart inside the allocation (cluster.restart), how often this allocation restarted it."""
    return f"{job_id}.{requeues}" + (f".{restarts}" if restarts else "")


def _timestamp(value: str | None) -> float | None:
    """SLURM's local-time ISO stamp (2026-11-30T02:20:49) as epoch seconds; None for Unknown / None."""
    try:
        return datetime.datetime.fromisoformat(value).timestamp() if value else None
    except ValueError:
        return None


def queue_times(job_id: str) -> dict:
    """This attempt's submit and start times from scontrol (sacct when scontrol no longer knows the job) and
    the queue wait between them; {} where SLURM says neither. A requeued job's SubmitTime is its requeue."""
    result = subprocess.run(["scontrol", "--oneliner", "show", "job", str(job_id)], capture_output=True, text=True,
                            timeout=30)
    fields = parse_scontrol_job(result.stdout) if result.returncode == 0 else {}
    submit, start = _timestamp(fields.get("SubmitTime")), _timestamp(fields.get("StartTime"))
    if (submit is None or start is None) and shutil.which("sacct"):
        acct = subprocess.run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "Submit,Start"],
                              capture_output=True, text=True, timeout=30)
        line = acct.stdout.strip().splitlines()[-1] if acct.returncode == 0 and acct.stdout.strip() else ""
        submit, start = (_timestamp(part) for part in (line.split("|") + ["", ""])[:2])
    if submit is None or start is None:
        return {}
    return {"submit_t": submit, "start_t": start, "seconds": max(0.0, start - submit)}


def attempt_started(job_dir: str, job_id: str, inc: str, attempt: int, hosts: list[str], restarted: bool) -> None:
    """`hosts`: the step's (the allocation's less its spares); a restart inside the allocation waited in no queue."""
    record_launch(job_dir, inc, len(hosts), "slurm", job_id=job_id, attempt=attempt, hosts=hosts,
                  **({} if restarted else queue_times(job_id)))


def attempt_ended(job_dir: str, inc: str, code: int, stop: str | None, cause: str | None = None) -> None:
    """An attempt that ended before torchrun (in the doctor); `cause`: what ended it."""
    record_exit(job_dir, inc, code, stop, cause)


def attempt_undecided(job_dir: str, inc: str) -> bool:
    """Whether the attempt started (its launch event) but its first node's task neither ended it nor requeued
    or restarted the job: that task was killed before it could (cluster.teardown decides then)."""
    kinds = {e["kind"] for e in event_ledger.read(job_dir) if e.get("inc") == inc}
    return event_ledger.LAUNCH in kinds and not kinds & {event_ledger.EXIT, event_ledger.REQUEUE, event_ledger.RESTART}


def attempt_hosts(job_dir: str, inc: str) -> list[str] | None:
    """The hosts the attempt's step ran on, from its launch event (None: not recorded)."""
    hosts = [e.get("hosts") for e in event_ledger.read(job_dir) if e.get("inc") == inc and e["kind"] == event_ledger.LAUNCH]
    return hosts[-1] if hosts and isinstance(hosts[-1], list) else None


def restart_pending(job_dir: str, inc: str) -> bool:
    """Whether a restart inside the allocation names `inc` as its next attempt and no step was run for it yet
    (once only: a step whose tasks die before their launch event must not loop)."""
    events = event_ledger.read(job_dir)
    return any(e["kind"] == event_ledger.RESTART and e.get("next") == inc for e in events) and \
        not any(e["kind"] == event_ledger.NEW_STEP and e.get("inc") == inc for e in events)


def new_step(job_dir: str, inc: str, exclude: list[str]) -> None:
    event_ledger.append(job_dir, event_ledger.NEW_STEP, inc=inc, exclude=exclude)


def restarted(job_dir: str, inc: str, next_inc: str, exclude: list[str], reason: str) -> None:
    event_ledger.append(job_dir, event_ledger.RESTART, inc=inc, next=next_inc, exclude=exclude, reason=reason)


def requeued(job_dir: str, inc: str, reason: str) -> None:
    event_ledger.append(job_dir, event_ledger.REQUEUE, inc=inc, reason=reason)


def submitted(job_dir, job_id: str, nodes: int, warning_s: float, t: float) -> None:
    """`t`: when sbatch was called, so the event precedes the job's start however fast it began; `warning_s`:
    how long before its time limit SLURM signals it (what a save on that signal must fit in)."""
    event_ledger.append(job_dir, event_ledger.SUBMIT, t=t, inc=attempt_id(job_id, 0), job_id=job_id, nodes=nodes,
                  warning_s=warning_s)
