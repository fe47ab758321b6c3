"""The cluster's earlier jobs, for the failure rate that `save_strategy: auto` plans with.

LLAUNCH_HOME/history/CLUSTER.txt (launcher.env.history_dir) lists the job directories that ran on this cluster
(SLURM's cluster name, or this host), one a line. The launcher side adds a job before its ranks start (`llaunch
run`, the first node's task: `register`); rank 0 of a job under auto only reads the ledgers of the last
HISTORY_JOBS others, once per incarnation, so a rank writes nothing outside its job dir. Best effort: a list or a ledger that cannot be read counts as no history, with a warning,
and a damaged line of a ledger is skipped (launcher.observe.event_ledger.read); none of them stops the job.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from launcher.env import history_dir
from launcher.errors import LaunchError
from launcher.files import open_regular
from launcher.observe import event_ledger, goodput

HISTORY_JOBS = 20  # earlier jobs of the same cluster whose failures count towards the MTBF


def history_file() -> Path:
    """The list of job directories that ran on this cluster (SLURM's cluster name, or this host)."""
    cluster = os.environ.get("SLURM_CLUSTER_NAME") or f"local-{socket.gethostname()}"
    return history_dir() / f"{cluster}.txt"


def register(job_dir: str | Path) -> None:
    """Add the job to its cluster's list for the jobs after it (the launcher side, before the ranks start); a
    list that cannot be read or written is left as it is: the history is advice."""
    path, me = history_file(), str(Path(job_dir).resolve())
    try:
        if me in _listed(path):
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(me + "\n")
    except (LaunchError, OSError):
        pass


def cluster_history(job_dir: str | Path) -> tuple[float, int]:
    """Node-seconds running and failures of the last HISTORY_JOBS other jobs on this cluster, from their
    ledgers; reads only."""
    me = str(Path(job_dir).resolve())
    try:
        listed = _listed(history_file())
    except LaunchError as err:
        _warn(f"{err} The checkpoint cadence goes on without the cluster's earlier jobs.")
        return 0.0, 0
    node_s, failures = 0.0, 0
    for other in [p for p in listed if p and p != me][-HISTORY_JOBS:]:
        try:
            events = event_ledger.read(other)
        except LaunchError as err:
            _warn(f"{err} Its failures do not count towards this job's checkpoint cadence.")
            continue
        if events:
            report = goodput.analyse(events, event_ledger.launcher_alive(events))
            node_s, failures = node_s + report.running_s * report.nodes, failures + report.failures
    return node_s, failures


def _listed(path: Path) -> list[str]:
    handle = open_regular(path)
    if handle is None:
        return []
    with handle:
        try:
            return handle.read().decode(errors="replace").splitlines()
        except OSError as err:
            raise LaunchError(f"cannot read {path} ({err.strerror or err}).") from None


def _warn(sentence: str) -> None:
    print(f"llaunch: warning: {sentence}", file=sys.stderr, flush=True)
