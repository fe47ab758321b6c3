"""The job's event ledger: one JSONL line per event in JOB_DIR/events.jsonl, from every process of the job.

The launcher (`llaunch run`, `llaunch submit`, the node task), rank 0 and the watchdog append to the same
file. Each event is one `write` on a descriptor opened with O_APPEND and is fsynced, so lines from several
processes never interleave and an event is on disk before the process goes on; a `kill -9` can at most tear
the last line. The ledger is evidence, never a reason to stop: a failed append warns once and training goes
on, and the reader skips a damaged line (torn, not JSON, a field of the wrong type) with a warning, so one bad
line never stops a run, a submit or `llaunch goodput`. `launcher.observe.goodput` turns the events into where the
job's time went.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import psutil

from launcher import env
from launcher.jobdir.layout import JobDir
from launcher.errors import EXIT_USER_ERROR, REQUEUE_EXIT_CODE
from launcher.files import read_records


# A rank writes a step window at each logging step, and at least this often between them.
STEP_WINDOW_S = 60.0

# Event kinds, by who writes them. Launcher side:
SUBMIT = "submit"              # llaunch submit: the job went into the queue
LAUNCH = "launch"              # an incarnation starts (llaunch run, or node 0's task); seconds = its queue wait
EXIT = "exit"                  # the incarnation ended: code, cause (finished / failed / signal name)
REQUEUE = "requeue"            # the node task handed the job back to the queue
RESTART = "restart"            # the node task restarted the job in a new step of its allocation (no queue)
NEW_STEP = "new_step"          # the batch script ran that step (once, whether or not its tasks got to launch)
SIGNAL = "signal"              # a stop signal reached the launcher or rank 0
HANG = "hang"                  # the watchdog: seconds = detection latency (time lost before it saw the hang)
STRAGGLER = "straggler"        # the watchdog: seconds = time the slowest rank cost the others since its last event
# Rank 0:
PROCESS_START = "process_start"
DIST_INIT = "dist_init"
MODEL_BUILT = "model_built"
RESTORE = "restore"            # seconds = time to load the checkpoint, step = the step it resumed at
FIRST_STEP = "first_step"      # the incarnation's first optimizer step is done
STEPS = "steps"                # a step window: step, tokens
SAVE = "save"                  # seconds = blocking time of the save, step; ok false when it failed
SAVE_BACKGROUND = "save_background"  # async_save: seconds from the save's start until it was published
EVAL = "eval"                  # seconds, step
TRAIN_END = "train_end"        # the loop ended (cause: finished, preempted, early stop); what follows is shutdown
FINAL_SAVED = "final_saved"    # seconds to write DIR/final
CADENCE = "cadence"            # the auto checkpoint interval and its inputs

USER_ERROR = "user error"
KILLED = "killed"  # the cause of an incarnation that left no exit event of its own: its every process was SIGKILLed

# The fields readers compute with, and what each must be where present: a number in [0, LARGEST] (epoch times,
# durations, counts; the bound keeps every sum of them finite), an integer among those, or text.
LARGEST = 1e12
NUMBER_FIELDS = ("t", "seconds", "start_t", "submit_t", "warning_s")
INTEGER_FIELDS = ("step", "tokens", "nodes")
TEXT_FIELDS = ("kind", "inc", "cause")

_warned = False


def incarnation_id() -> str:
    """This process's incarnation: the launcher's id, with torchrun's restart count when it restarted the ranks."""
    base = env.INCARNATION.get() or new_incarnation_id()  # a rank started by hand makes up its own
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return base if restart in ("", "0") else f"{base}+{restart}"


def new_incarnation_id() -> str:
    return f"{socket.gethostname()}.{os.getpid()}.{int(time.time())}"


def append(job_dir: str | Path, kind: str, *, t: float | None = None, inc: str | None = None, **fields) -> None:
    """Append one event (wall time, incarnation, host, pid, kind, fields) and fsync it; never raises.
    `t` and `inc` default to now and this process's incarnation."""
    global _warned
    event = {"t": round(time.time() if t is None else t, 3), "inc": inc or incarnation_id(), "host": socket.gethostname(),
             "pid": os.getpid(), "kind": kind, **fields}
    line = (json.dumps(event, default=str) + "\n").encode()
    try:
        fd = os.open(JobDir(job_dir).events, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):  # a FIFO would block the writer once its buffer is full
                raise OSError(0, "not a regular file")
            size = info.st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # The line a killed writer tore stays one bad line of its own (a write still under way elsewhere
                # can look torn too; that costs a blank line, which the reader skips).
                line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        if not _warned:
            _warned = True
            print(f"llaunch: warning: cannot append to the event ledger in {job_dir} ({err.strerror or err}); "
                  f"training goes on without it", file=sys.stderr, flush=True)


def exit_cause(code: int) -> str:
    """An incarnation's end in a word: finished, preempted (saved and asked to be requeued), user error (the
    one-sentence kind: a config to fix, not a machine that failed), a signal, failed."""
    if code == 0:
        return "finished"
    if code == REQUEUE_EXIT_CODE:
        return "preempted"
    if code == EXIT_USER_ERROR:
        return USER_ERROR
    if code < 0 or code > 128:
        try:
            return signal.Signals(-code if code < 0 else code - 128).name
        except ValueError:
            pass
    return "failed"


def launcher_alive(events: list[dict]) -> bool:
    """Whether the process that launched the newest incarnation may still run: False only when its launch
    event was written on this host by a process that is gone (or whose pid a younger process took), which tells
    an incarnation whose every process was SIGKILLed (no exit event) from one still running."""
    launches = [e for e in events if e["kind"] == LAUNCH]
    if not launches or launches[-1].get("host") != socket.gethostname() or not isinstance(launches[-1].get("pid"), int):
        return True
    try:
        return psutil.Process(launches[-1]["pid"]).create_time() <= launches[-1]["t"] + 1.0
    except psutil.Error:
        return False


def read(job_dir: str | Path) -> list[dict]:
    """Every complete event, in time order; a damaged line is skipped with a warning (read_records)."""
    return sorted(read_records(JobDir(job_dir).events, check_event), key=lambda e: e["t"])


def check_event(record) -> dict:
    """One ledger line's event as it is, or ValueError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    for name in ("t", "kind"):
        if name not in record:
            raise ValueError(f"no {name!r}")
    for name in NUMBER_FIELDS + INTEGER_FIELDS:
        value = record.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int if name in INTEGER_FIELDS else (int, float)) \
                or not 0 <= value <= LARGEST:  # NaN compares false
            what = "an integer" if name in INTEGER_FIELDS else "a number"
            raise ValueError(f"{name!r} is {value!r}, not {what} from 0 to {LARGEST:.0e}")
    for name in TEXT_FIELDS:
        if not isinstance(record.get(name, ""), str):
            raise ValueError(f"{name!r} is {record[name]!r}, not text")
    if not isinstance(record.get("ok", True), bool):
        raise ValueError(f"'ok' is {record['ok']!r}, not true or false")
    return record


class RankLedger:
    """What a rank writes: rank 0 appends, every other rank does nothing (one writer per job, no duplicates)."""

    def __init__(self, job_dir: str | Path, rank: int):
        self.job_dir = job_dir
        self.enabled = rank == 0
        self._first_step_done = False
        self._last_window = time.time()

    def append(self, kind: str, **fields) -> None:
        if self.enabled:
            append(self.job_dir, kind, **fields)

    def started(self) -> None:
        """The process started (its creation time, so interpreter and torch imports count) and joined the group."""
        self.append(PROCESS_START, t=psutil.Process().create_time())
        self.append(DIST_INIT)

    def step_end(self, step: int, tokens: int, log_due: bool) -> None:
        """At each step boundary: the incarnation's first step, then a window at logging steps or every
        STEP_WINDOW_S."""
        if not self.enabled:
            return
        now = time.time()
        if not self._first_step_done:
            self._first_step_done = True
            self.append(FIRST_STEP, step=step, tokens=tokens)
        elif log_due or now - self._last_window >= STEP_WINDOW_S:
            self.append(STEPS, step=step, tokens=tokens)
        else:
            return
        self._last_window = now
