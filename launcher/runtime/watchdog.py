"""The hang watchdog, in the process that started torchrun on a node (launcher.runtime.node, for `llaunch run`
and each SLURM node task): outside the ranks, so a rank that holds the GIL, sits in a C call or was stopped is still seen.

Every `poll_s` it reads the local ranks' progress beacons (launcher.runtime.beacon). A rank that stays in one phase
longer than that phase's timeout is a hang: `k` x the rolling p99 of the phase's durations, at least
`floor_s`; the first step and a phase never seen to end get `first_step_s` (or `k` x the longest an earlier
launch into the job dir measured, compile included: a hang at a requeue's first step is seen as fast),
checkpoint saves and loads `checkpoint_s`. Then, in order: every local rank's Python stacks (py-spy when installed and allowed,
else the faulthandler the rank registered on launcher.runtime.signals.STACK_DUMP_SIGNAL), the last beacon of every
rank, a request that the other nodes' watchdogs dump theirs into the same folder, and the evidence record
naming the rank that is behind. The caller then kills the ranks and exits with HANG_EXIT_CODE. At the end it
also says which local ranks the straggler score flagged (their beacons carry it). What goes into the node
ledger is launcher.runtime.node's.

Configured by launcher.runtime.watchdog_config.WatchdogConfig (launcher.env.WATCHDOG).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.runtime.watchdog_config import WatchdogConfig
from launcher.observe import event_ledger
from launcher.runtime.beacon import Beacon, Phase, beacon_folder, read_beacons, stacks_path
from launcher.errors import LaunchError
from launcher.files import write_text_atomic
from launcher.jobdir.layout import JobDir
from launcher.runtime.signals import STACK_DUMP_SIGNAL, catches, ranks_of, send_signal

EVIDENCE_FILE = "evidence.json"
DUMP_REQUEST = "dump-request.json"  # the detecting node asks every other node to dump into the same folder
CHECKPOINT_PHASES = (Phase.SAVE, Phase.LOAD)
# How far along a step each phase is: a resume loads before its first step, evaluation and saving follow it.
STEP_ORDER = (Phase.START, Phase.LOAD, Phase.DATA, Phase.COMPUTE, Phase.SYNC, Phase.EVAL, Phase.SAVE, Phase.DONE)
UNWATCHED_PHASES = (Phase.DONE,)


@dataclass(frozen=True)
class Hang:
    """What the watchdog saw: the rank(s) over their timeout, and every local rank's beacon at that moment."""

    stuck: tuple[int, ...]
    beacons: dict[int, Beacon]
    timeouts: dict[int, float]  # per stuck rank: the timeout its phase had


def describe(folder: Path) -> str:
    """One sentence for the log: who is behind and where the evidence is."""
    evidence = folder / EVIDENCE_FILE
    if not evidence.is_file():
        return f"another node saw a hang; this node's stacks and beacons are in {folder}"
    record = json.loads(evidence.read_text())
    culprit = record["culprit"]
    who = f"rank {culprit['rank']} on {culprit['host']}" if culprit else "no single rank"
    return f"hang: {who} is behind ({record['why']}); stacks and evidence in {folder}"


def latest_hang(job_dir: str | Path) -> str | None:
    """What `llaunch status` says about the newest hang this job dir holds evidence of (None: no hang)."""
    folders = sorted(p.parent for p in JobDir(job_dir).hangs.glob(f"*/{EVIDENCE_FILE}"))
    return describe(folders[-1]) if folders else None


def hang_culprit(folder: Path, wait_s: float) -> tuple[str, str] | None:
    """The host the evidence record names as behind, and why; waits up to `wait_s` for the record when another
    node detected the hang and is still writing it. None when there is no record or no single culprit."""
    evidence = folder / EVIDENCE_FILE
    deadline = time.monotonic() + wait_s
    while not evidence.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    record = json.loads(evidence.read_text()) if evidence.is_file() else {}
    return (record["culprit"]["host"], record["why"]) if record.get("culprit") else None


def kill_ranks(torchrun_pid: int) -> None:
    """SIGKILL torchrun first (it would restart or wait for its workers), then the workers it had."""
    workers = ranks_of(torchrun_pid)
    send_signal(torchrun_pid, signal.SIGKILL)
    for worker in workers:
        send_signal(worker.pid, signal.SIGKILL)


class Watchdog:
    def __init__(self, folder: Path, job_dir: Path, config: WatchdogConfig, host: str | None = None, nodes: int = 1,
                 incarnation: str | None = None):
        self.folder, self.job_dir, self.config, self.nodes = Path(folder), Path(job_dir), config, nodes
        self.incarnation = incarnation  # the launch whose ranks it watches: its hang event goes into that lane
        # SLURM's name for the node (what --exclude takes; two slurmd on one host differ by it), else the host's
        self.host = host or os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        self.durations: dict[Phase, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=config.window))
        self._ended: dict[tuple[int, Phase], int] = {}
        self._longest: dict[str, float] = {}  # phase name -> the longest duration seen in this launch
        self._measured = measured_phases(self.job_dir)  # ... and in the earlier launches into this job dir
        self._started_wall = time.time()
        self._answered: set[Path] = set()
        self._next_check = 0.0

    @classmethod
    def create(cls, job_dir: Path, key: str, config: WatchdogConfig, host: str | None = None, nodes: int = 1,
               incarnation: str | None = None) -> "Watchdog | None":
        """A watchdog with a new beacon folder (its ranks learn it from launcher.runtime.node.rank_env), or None
        when its config turns it off."""
        if not config.enabled:
            return None
        return cls(beacon_folder(job_dir, key), Path(job_dir), config, host=host, nodes=nodes, incarnation=incarnation)

    # ----- detection ------------------------------------------------------------------------------------
    def timeout(self, beacon: Beacon) -> float:
        phase = beacon.phase
        if phase in UNWATCHED_PHASES:
            return float("inf")
        if phase in CHECKPOINT_PHASES:
            return self.config.checkpoint_s
        if phase == Phase.START:
            return self.config.first_step_s
        samples = self.durations[phase]
        # The rank's own count, not the first step this watchdog saw: a first poll that comes late (a loaded
        # node) meets a rank whose phase has ended many times, and must not grant it first_step_s.
        if not beacon.ended[phase] or not samples:
            measured = self._measured.get(phase.name, float("inf"))  # by an earlier launch, compile included
            return min(self.config.first_step_s, max(self.config.floor_s, self.config.k * measured))
        return max(self.config.floor_s, self.config.k * p99(samples))

    def poll(self, now: float | None = None) -> Hang | None:
        """Read the beacons, learn the phase durations, return a Hang when a rank is over its timeout."""
        now = time.monotonic() if now is None else now
        beacons = read_beacons(self.folder)
        for beacon in beacons.values():
            for phase in Phase:
                ended = beacon.ended[phase]
                if ended > self._ended.get((beacon.rank, phase), 0):
                    self.durations[phase].append(beacon.last_duration[phase])
                    self._longest[phase.name] = max(self._longest.get(phase.name, 0.0), beacon.last_duration[phase])
                    self._ended[beacon.rank, phase] = ended
        timeouts = {rank: self.timeout(b) for rank, b in beacons.items()}
        stuck = tuple(rank for rank, b in beacons.items() if b.age(now) > timeouts[rank])
        if stuck:
            return Hang(stuck, beacons, {rank: timeouts[rank] for rank in stuck})
        return None

    def requested_dump(self) -> Path | None:
        """Another node's watchdog saw a hang and asks this node to dump into its folder."""
        hangs = JobDir(self.job_dir).hangs
        if not hangs.is_dir():
            return None
        for request in hangs.glob(f"*/{DUMP_REQUEST}"):
            if request not in self._answered and request.stat().st_mtime >= self._started_wall:
                self._answered.add(request)
                return request.parent
        return None

    def check(self) -> Path | None:
        """One poll. On a hang here, or a dump another node asked for, dump and return the hangs/ folder: the
        caller then kills the ranks. Another node's request comes first even when this node sees a hang too (its
        ranks wait for that node's): one folder, whose evidence then holds every node's beacons. Polls at most
        every poll_s, however often it is called."""
        if time.monotonic() < self._next_check:
            return None
        self._next_check = time.monotonic() + self.config.poll_s
        hang = self.poll()
        request = self.requested_dump()
        if request is not None:
            return self.respond(None, into=request)
        return None if hang is None else self.respond(hang)

    # ----- response ----------------------------------------------------------------------------------
    def respond(self, hang: Hang | None, into: Path | None = None) -> Path:
        """Dump every local rank's stacks and beacons into a new hangs/ folder (or `into`, another node's);
        the detecting node also asks the others to dump and writes the evidence record. Returns the folder."""
        beacons = hang.beacons if hang else read_beacons(self.folder)
        now = time.monotonic()
        if into is None:
            # The detecting node's name too: two nodes that see the hang in the same second open a folder each
            # (in one shared folder their dump-request.json writes collide).
            into = JobDir(self.job_dir).hangs / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{self.host}"
            into.mkdir(parents=True, exist_ok=True)
            self._answered.add(into / DUMP_REQUEST)
            write_text_atomic(into / DUMP_REQUEST, json.dumps({"host": self.host, "time": time.time()}))
        self._write_beacons(beacons, into, now)
        stacks = self.dump_stacks(beacons, into)
        if hang is not None:
            self.write_evidence(hang, into, stacks)
            self.record_hang(hang, now)
        return into

    def record_hang(self, hang: Hang, now: float) -> None:
        """The hang as an event of the job's ledger (launcher/observe/event_ledger.py): the time the stuck rank spent in its
        phase before the watchdog saw it is goodput's "hang" time."""
        stalled = max(hang.beacons[rank].age(now) for rank in hang.stuck)
        event_ledger.append(self.job_dir, event_ledger.HANG, inc=self.incarnation, seconds=round(stalled, 3),
                      step=min(b.step for b in hang.beacons.values()), ranks=list(hang.stuck))

    def _write_beacons(self, beacons: dict[int, Beacon], into: Path, now: float) -> None:
        views = [{**b.to_dict(now), "host": self.host} for b in beacons.values()]
        write_text_atomic(into / f"beacons-{self.host}.json", json.dumps(views, indent=1))

    def dump_stacks(self, beacons: dict[int, Beacon], into: Path) -> dict[int, str]:
        """Each rank's Python stacks into `into`/stacks-rank-R.txt; py-spy first, the rank's faulthandler else."""
        files = {}
        waiting = {}
        for rank, beacon in beacons.items():
            target = into / f"stacks-rank-{rank}.txt"
            if py_spy_dump(beacon.pid, target):
                files[rank] = target.name
            elif catches(beacon.pid, STACK_DUMP_SIGNAL):
                start = _size(stacks_path(self.folder, rank))
                send_signal(beacon.pid, STACK_DUMP_SIGNAL)
                send_signal(beacon.pid, signal.SIGCONT)  # a stopped rank handles the signal once it runs again
                waiting[rank] = (start, target)
        deadline = time.monotonic() + self.config.grace_s
        while waiting and time.monotonic() < deadline:
            time.sleep(0.1)
            for rank, (start, target) in list(waiting.items()):
                source = stacks_path(self.folder, rank)
                if _size(source) > start and _settled(source):
                    with source.open("rb") as f:
                        f.seek(start)
                        target.write_bytes(f.read())
                    files[rank] = target.name
                    del waiting[rank]
        return files

    def write_evidence(self, hang: Hang, into: Path, stacks: dict[int, str]) -> None:
        """evidence.json: who is behind, over the ranks of every node that answered the dump request within
        grace_s (a node that did not answer is named by its absence: nodes_answered < nodes)."""
        deadline = time.monotonic() + self.config.grace_s
        while True:
            complete = len(list(into.glob("beacons-*.json"))) >= self.nodes
            # A node that saw the hang too opened its own folder and waits there for ours (its request was
            # written before its beacons reached our folder, so it is seen here at the latest with them).
            while (other := self.requested_dump()) is not None:
                self._write_beacons(hang.beacons, other, time.monotonic())
            if complete or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        answered = sorted(into.glob("beacons-*.json"))
        views = [view for path in answered for view in json.loads(path.read_text())]
        record = {
            "detected_by": self.host,
            "nodes_answered": f"{len(answered)} of {self.nodes}",
            "time": time.time(),
            "stuck_ranks": list(hang.stuck),
            "timeouts_s": {str(rank): round(t, 3) for rank, t in hang.timeouts.items()},
            **attribute(views),
            "ranks": views,
            "stacks": {str(rank): name for rank, name in sorted(stacks.items())},
        }
        write_text_atomic(into / EVIDENCE_FILE, json.dumps(record, indent=1))

    def stragglers(self) -> dict[int, int]:
        """This node's ranks the straggler score flags now, each with the logging step that flagged it (their
        beacons say; call it before close())."""
        return {rank: b.straggler_step for rank, b in read_beacons(self.folder).items() if b.straggler_step}

    def close(self) -> None:
        """Keep the phases' longest durations for the next launch; remove the beacon folder this watchdog created."""
        if self._longest:  # optional: a failed write costs the next launch only its quicker first-step timeout
            with contextlib.suppress(LaunchError, OSError):
                write_text_atomic(JobDir(self.job_dir).watchdog_phases(self.host),
                                  json.dumps({**self._measured, **self._longest}))
        shutil.rmtree(self.folder, ignore_errors=True)


def measured_phases(job_dir: Path) -> dict[str, float]:
    """The longest each phase took in an earlier launch, over its nodes ({} without one; bad files skipped)."""
    longest: dict[str, float] = {}
    for path in Path(job_dir).glob(JobDir(job_dir).watchdog_phases("*").name):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for name, value in data.items() if isinstance(data, dict) else ():
            if name in Phase.__members__ and isinstance(value, (int, float)) and 0 < value < float("inf"):
                longest[name] = max(longest.get(name, 0.0), float(value))
    return longest


def attribute(views: list[dict]) -> dict:
    """The rank that is behind: the one least far along, by step and then by phase in the order a step goes
    through them (the others wait for it in the next collective: DDP's buffer broadcast in forward, the
    gradient reduction, a vote). Several when several are equally behind; none when every rank is at the
    same place (the cause is outside the ranks: network, storage, a peer node)."""
    if not views:
        return {"culprit": None, "behind": [], "why": "no rank wrote a beacon"}
    if len(views) == 1:
        only = views[0]
        return {"culprit": {"rank": only["rank"], "host": only["host"]}, "behind": [{"rank": only["rank"],
                "host": only["host"]}], "why": f"the only rank, in {only['phase']} of step {only['step']}"}
    place = {v["rank"]: (v["step"], STEP_ORDER.index(Phase[v["phase"].upper()])) for v in views}
    last = min(place.values())
    if last == max(place.values()):
        return {"culprit": None, "behind": [], "why": f"every rank is in {views[0]['phase']} of step {views[0]['step']}"}
    behind = sorted((v for v in views if place[v["rank"]] == last), key=lambda v: -v["in_phase_s"])
    ahead = max(views, key=lambda v: place[v["rank"]])
    culprit = behind[0]
    return {"culprit": {"rank": culprit["rank"], "host": culprit["host"]},
            "behind": [{"rank": v["rank"], "host": v["host"]} for v in behind],
            "why": f"in {culprit['phase']} of step {culprit['step']} while rank {ahead['rank']} is in "
                   f"{ahead['phase']} of step {ahead['step']}"}


def p99(samples) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def py_spy_dump(pid: int, target: Path) -> bool:
    """py-spy's view of `pid` (native frames too), when py-spy is installed and ptrace is allowed."""
    exe = shutil.which("py-spy")
    if exe is None:
        return False
    try:
        result = subprocess.run([exe, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    if result.returncode != 0:
        return False
    write_text_atomic(target, result.stdout)
    return True


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _settled(path: Path) -> bool:
    """faulthandler writes a dump in pieces: done when the size holds still for a moment."""
    size = _size(path)
    time.sleep(0.05)
    return _size(path) == size
