"""Progress beacons, torch-free: where each rank is (step, phase, since when) and whether the straggler score
flags it, readable from outside the rank.

A rank writes its beacon into a small file mapped into memory (`/dev/shm` when the node has it, else a
folder of the job dir): a phase boundary is a few stores into that mapping, no system call and no wait on
the GPU. The process that started torchrun reads every local rank's beacon with a plain read, so it still
sees where a rank stopped when the rank holds the GIL, sits in a C call or was stopped by a signal.

Times are CLOCK_MONOTONIC seconds (`time.monotonic()`), which every process of one host shares, so the
reader compares a rank's phase start with its own clock.

The straggler signal travels the same way: at each logging step every rank learns every rank's busy time
(launcher.observe.straggler) and writes its own busy time and, while it is flagged, the step that flagged it;
the watchdog reads them beside the phases, so no one rereads rank 0's metrics.

Layout: one array of float64 slots (integers stored exactly below 2**53). Slot SEQ is a sequence lock: the
writer makes it odd while it writes and even when done; a reader retries while it is odd or changed.
"""

from __future__ import annotations

import enum
import faulthandler
import mmap
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from launcher.files import write_text_atomic
from launcher.runtime.signals import STACK_DUMP_SIGNAL

SHM = Path("/dev/shm")
LAYOUT_VERSION = 2


class Phase(enum.IntEnum):
    """What a rank is doing. SYNC is where it waits for the others: the final micro-batch's backward (the
    gradient reduction), the optimizer step and the step-boundary vote; DATA and COMPUTE are its own work."""

    START = 0  # process group up, model being built, before the first step
    DATA = 1
    COMPUTE = 2
    SYNC = 3
    EVAL = 4
    SAVE = 5
    LOAD = 6
    DONE = 7


# Slot indices; after them, per phase: how often it ended and how long it lasted the last time. BUSY_S: the
# rank's busy time per step (median of its last logging window); STRAGGLER_STEP: the logging step whose
# straggler score flagged it, 0 while it is not flagged.
VERSION, PID, SEQ, STEP, PHASE, PHASE_START, BUSY_S, STRAGGLER_STEP = range(8)
PHASE_SLOTS = 8
SLOTS = PHASE_SLOTS + 2 * len(Phase)
SIZE = SLOTS * 8


def _ended_slot(phase: int) -> int:
    return PHASE_SLOTS + 2 * phase


def beacon_path(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"rank-{rank}.beacon"


def stacks_path(folder: str | Path, rank: int) -> Path:
    """Where the rank's faulthandler writes its Python stacks when asked (launcher.runtime.signals.STACK_DUMP_SIGNAL)."""
    return Path(folder) / f"rank-{rank}.stacks"


def register_stack_dump(folder: str | Path, rank: int):
    """In the rank, at start: faulthandler writes every thread's Python stack to stacks_path() when the
    launcher sends STACK_DUMP_SIGNAL, from C, so also while the rank holds the GIL. Returns the open file
    (keep it open; give it to unregister_stack_dump)."""
    file = stacks_path(folder, rank).open("w")
    faulthandler.register(STACK_DUMP_SIGNAL, file=file, all_threads=True)
    return file


def unregister_stack_dump(file) -> None:
    faulthandler.unregister(STACK_DUMP_SIGNAL)
    file.close()


BEACON_FOLDER_PREFIX = "llaunch-beacons-"
OWNER_FILE = "owner"  # in a beacon folder: "PID START_TIME" of the launcher that made it


def beacon_folder(job_dir: str | Path, key: str) -> Path:
    """A new folder for one launch's beacons: in /dev/shm (memory, never on a shared file system) when the node
    has it, else in the job dir. `key` names the launch (`run`, the SLURM job id and node) for a reader of
    /dev/shm; the folder is made unique (mkdtemp), since two launches can share a key (two clusters' jobs of one
    id on a node, stand-in jobs in tests) and one's close must never remove the folder the other's ranks write
    into. Folders a launcher that is gone left there (a SIGKILL gives it no time) are removed first."""
    root = SHM if SHM.is_dir() and os.access(SHM, os.W_OK) else Path(job_dir)
    reap_beacon_folders(root)
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{BEACON_FOLDER_PREFIX}{key}-", dir=root))
    me = psutil.Process()
    write_text_atomic(folder / OWNER_FILE, f"{me.pid} {me.create_time()!r}")
    return folder


def reap_beacon_folders(root: Path) -> None:
    """Remove the beacon folders under `root` whose launcher is gone: only folders llaunch made (their owner
    file says so), and never one whose launcher still runs (the pid's start time tells a reused pid apart)."""
    for folder in root.glob(f"{BEACON_FOLDER_PREFIX}*"):
        try:
            pid, started = (folder / OWNER_FILE).read_text().split()
            alive = psutil.Process(int(pid)).create_time() == float(started)
        except psutil.NoSuchProcess:
            alive = False
        except (OSError, ValueError, psutil.Error):
            continue  # not one llaunch made, or one it cannot judge: left alone
        if not alive:
            shutil.rmtree(folder, ignore_errors=True)


class BeaconWriter:
    """The rank's side. `enter(phase)` is the only call in the loop's hot path."""

    def __init__(self, path: Path | None, step: int = 0):
        """path None: anonymous memory, for a rank no launcher watches (the phase times still count)."""
        if path is None:
            self._map = mmap.mmap(-1, SIZE)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, SIZE)
                self._map = mmap.mmap(fd, SIZE)
            finally:
                os.close(fd)
        self._slots = memoryview(self._map).cast("d")
        self._slots[VERSION] = LAYOUT_VERSION
        self._slots[PID] = os.getpid()
        self.phase, self.phase_start, self.step = Phase.START, time.monotonic(), step
        self._slots[STEP], self._slots[PHASE], self._slots[PHASE_START] = step, Phase.START, self.phase_start

    def enter(self, phase: Phase, step: int | None = None) -> float:
        """Mark the start of `phase` (of `step`, default the current one); re-entering the current phase of the
        same step changes nothing. Returns how long the phase that ended lasted (0.0 when nothing changed)."""
        step = self.step if step is None else step
        if phase == self.phase and step == self.step:
            return 0.0
        now = time.monotonic()
        ended, lasted = self.phase, now - self.phase_start
        slots = self._slots
        slots[SEQ] += 1
        slots[_ended_slot(ended)] += 1
        slots[_ended_slot(ended) + 1] = lasted
        slots[STEP], slots[PHASE], slots[PHASE_START] = step, phase, now
        slots[SEQ] += 1
        self.phase, self.phase_start, self.step = phase, now, step
        return lasted

    def report(self, busy_s: float, flagged: bool) -> None:
        """At a logging step: this rank's busy time per step and whether the straggler score flags it now."""
        slots = self._slots
        slots[SEQ] += 1
        slots[BUSY_S], slots[STRAGGLER_STEP] = busy_s, self.step if flagged else 0
        slots[SEQ] += 1

    def close(self) -> None:
        self._slots.release()
        self._map.close()


@dataclass(frozen=True)
class Beacon:
    """One reading of a rank's beacon."""

    rank: int
    pid: int
    step: int
    phase: Phase
    phase_start: float
    ended: tuple[int, ...]  # per phase: how many times it ended
    last_duration: tuple[float, ...]  # per phase: how long it lasted the last time
    busy_s: float = 0.0  # its busy time per step at the last logging step
    straggler_step: int = 0  # the logging step whose straggler score flagged it; 0: not flagged

    def age(self, now: float | None = None) -> float:
        """Seconds in the current phase."""
        return (time.monotonic() if now is None else now) - self.phase_start

    def to_dict(self, now: float | None = None) -> dict:
        return {"rank": self.rank, "pid": self.pid, "step": self.step, "phase": self.phase.name.lower(),
                "in_phase_s": round(self.age(now), 3)}


def read_beacon(path: Path, rank: int, attempts: int = 100) -> Beacon | None:
    """The rank's latest consistent record, or None when it has not written one (yet)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    for _ in range(attempts):
        if len(data) < SIZE:
            return None
        slots = memoryview(data).cast("d")
        seq = slots[SEQ]
        if slots[VERSION] == LAYOUT_VERSION and seq % 2 == 0:
            beacon = Beacon(
                rank=rank, pid=int(slots[PID]), step=int(slots[STEP]), phase=Phase(int(slots[PHASE])),
                phase_start=slots[PHASE_START],
                ended=tuple(int(slots[_ended_slot(p)]) for p in Phase),
                last_duration=tuple(slots[_ended_slot(p) + 1] for p in Phase),
                busy_s=slots[BUSY_S], straggler_step=int(slots[STRAGGLER_STEP]),
            )
            again = memoryview(path.read_bytes()).cast("d")
            if again[SEQ] == seq:
                return beacon
        data = path.read_bytes()
    return None


def read_beacons(folder: Path) -> dict[int, Beacon]:
    """Every rank's beacon in `folder`, by global rank."""
    found = {}
    for path in sorted(Path(folder).glob("rank-*.beacon")):
        rank = int(path.stem.split("-")[1])
        beacon = read_beacon(path, rank)
        if beacon is not None:
            found[rank] = beacon
    return found
