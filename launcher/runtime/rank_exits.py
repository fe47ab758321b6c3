"""Which rank failed first in a launch (`llaunch run`, or an attempt of a SLURM job), torch-free.

When one rank dies (the OOM killer, a lost GPU, an exception), its peers on every node fail a moment later
with collateral errors (gloo's "Connection closed by peer", DistNetworkError) that say nothing about the
cause. Each node's supervisor (launcher.runtime.node) watches its local ranks while torchrun runs (psutil: torchrun's children and the
RANK in their environment) and writes when each one ended into JOB_DIR/rank-exits/INCARNATION/node-N.json; the
rank that ended first over all nodes is the one that failed first (when a node's task itself died, SLURM
stops the other nodes' ranks: then the node that left no record is the culprit). The first node
keeps its judgement beside the records (culprit.json). Torchrun's and the ranks' own output are not read:
this module is the one home of that judgement, for the node ledger and the requeue (which node to blame)
and for `llaunch status` (which rank to name).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from launcher.files import write_text_atomic
from launcher.jobdir.layout import JobDir
from launcher.runtime.signals import ranks_of

VERDICT_FILE = "culprit.json"  # beside an attempt's records: the first node's judgement


@dataclass(frozen=True)
class RankExit:
    rank: int
    host: str
    node: int
    ended_t: float  # wall-clock time the supervisor first saw the rank gone (within its poll interval)


class RankWatch:
    """In the node supervisor's poll loop: learns each local rank's pid as it starts and notes when it is gone."""

    def __init__(self, host: str, node: int):
        self.host, self.node = host, node
        self._ranks: dict[int, tuple[int, psutil.Process]] = {}  # pid -> (global rank, process)
        self._ended: dict[int, float] = {}  # global rank -> wall time seen gone

    def poll(self, torchrun_pid: int) -> None:
        for proc in ranks_of(torchrun_pid):
            if proc.pid not in self._ranks:
                with contextlib.suppress(psutil.Error, ValueError, KeyError):  # not yet exec'd, or just gone
                    self._ranks[proc.pid] = (int(proc.environ()["RANK"]), proc)
        now = time.time()
        for rank, proc in self._ranks.values():
            if rank not in self._ended and not _alive(proc):
                self._ended[rank] = now

    def exits(self) -> list[RankExit]:
        """Every local rank's end; one still alive (torchrun has just exited) ends now."""
        now = time.time()
        return [RankExit(rank, self.host, self.node, self._ended.get(rank, now)) for rank, _ in self._ranks.values()]

    def save(self, job_dir: str | Path, attempt: str) -> None:
        path = exits_path(job_dir, attempt, self.node)
        write_text_atomic(path, json.dumps([vars(e) for e in self.exits()], indent=1))


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def exits_path(job_dir: str | Path, attempt: str, node: int) -> Path:
    return JobDir(job_dir).rank_exits / attempt / f"node-{node}.json"



def read_exits(job_dir: str | Path, attempt: str) -> list[RankExit]:
    """The ranks' ends of `attempt` on every node that recorded them; an unreadable file is skipped."""
    root = JobDir(job_dir).rank_exits
    found = []
    for path in sorted((root / attempt).glob("node-*.json")):
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            found += [RankExit(int(e["rank"]), str(e["host"]), int(e["node"]), float(e["ended_t"]))
                      for e in json.loads(path.read_text())]
    return found


def first_failure(exits: list[RankExit]) -> RankExit | None:
    """The rank that ended first, when it ended before every other (None for a tie or no record: nothing
    tells the cause from what followed it)."""
    ordered = sorted(exits, key=lambda e: e.ended_t)
    if not ordered or (len(ordered) > 1 and ordered[1].ended_t <= ordered[0].ended_t):
        return None
    return ordered[0]


def wait_for_nodes(job_dir: str | Path, attempt: str, nodes: int, wait_s: float) -> list[RankExit]:
    """Every node's record of `attempt`, waiting up to `wait_s` for the nodes still writing theirs."""
    deadline = time.monotonic() + wait_s
    while len(list((JobDir(job_dir).rank_exits / attempt).glob("node-*.json"))) < nodes and time.monotonic() < deadline:
        time.sleep(0.2)
    return read_exits(job_dir, attempt)


def describe(failure: RankExit) -> str:
    return f"rank {failure.rank} on {failure.host} failed first"


def culprit(exits: list[RankExit], hosts: list[str], task_died: bool = False) -> tuple[str, str] | None:
    """The host to blame and why: the rank that failed first; or, when SLURM ended the step because a node's
    task died (`task_died`: the other nodes' ranks then only stopped), the one node that left no record.
    None when nothing singles one out."""
    first = None if task_died else first_failure(exits)
    if first is not None:
        return first.host, describe(first)
    silent = sorted(set(range(len(hosts))) - {e.node for e in exits})
    if task_died and len(silent) == 1:
        return hosts[silent[0]], f"the node task on {hosts[silent[0]]} died"
    return None


def judge(job_dir: str | Path, attempt: str, hosts: list[str], task_died: bool,
          wait_s: float) -> tuple[str, str] | None:
    """On the first node, once `attempt` failed: the culprit from every node's record (waiting up to `wait_s`
    for them), kept beside the records for `llaunch status`."""
    found = culprit(wait_for_nodes(job_dir, attempt, len(hosts), wait_s), hosts, task_died)
    if found is not None:
        write_text_atomic(JobDir(job_dir).rank_exits / attempt / VERDICT_FILE, json.dumps({"host": found[0],
                                                                                          "why": found[1]}))
    return found


def latest_failure(job_dir: str | Path) -> str | None:
    """What `llaunch status` says about the newest attempt that failed with a culprit (None: none did)."""
    verdicts = sorted(JobDir(job_dir).rank_exits.glob(f"*/{VERDICT_FILE}"), key=lambda p: p.stat().st_mtime)
    if not verdicts:
        return None
    try:
        why = json.loads(verdicts[-1].read_text())["why"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    job, _, requeues = verdicts[-1].parent.name.partition(".")  # a SLURM attempt is JOB.REQUEUES
    attempt = f"attempt {int(requeues) + 1}: " if job.isdigit() and requeues.isdigit() else ""
    return f"{attempt}{why}; the other ranks' errors followed from it"
