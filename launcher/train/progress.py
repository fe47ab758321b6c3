"""The rank's side of hang and straggler detection: its progress beacon (launcher.runtime.beacon), a faulthandler
that writes its stacks when the launcher asks, the busy time per step the straggler score compares, and
injected faults (launcher.train.faults).

Every call here is cheap enough for the loop's hot path: a few stores into memory and a clock read; only
`straggler_report()`, at logging steps, talks to the other ranks.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch.distributed as dist

from launcher.env import BEACON_DIR
from launcher.runtime.beacon import (BeaconWriter, Phase, beacon_path, register_stack_dump,
                             unregister_stack_dump)
from launcher.observe.straggler import StragglerTracker
from launcher.train.faults import FaultInjector

BUSY_PHASES = (Phase.DATA, Phase.COMPUTE)


class Progress:
    def __init__(self, rank: int, world_size: int, folder: Path | None, faults: FaultInjector | None = None):
        self.rank, self.world_size = rank, world_size
        self.beacon = BeaconWriter(beacon_path(folder, rank) if folder else None)
        self.faults = faults
        self._stacks = register_stack_dump(folder, rank) if folder else None
        self._busy = 0.0
        self._window: list[float] = []
        self.tracker = StragglerTracker()  # on every rank: each learns whether it is flagged, for its beacon

    @classmethod
    def start(cls, rank: int, world_size: int) -> "Progress":
        """Writes a beacon when the launcher gave a folder for it (launcher.env.BEACON_DIR)."""
        folder = BEACON_DIR.get()
        return cls(rank, world_size, Path(folder) if folder else None, FaultInjector.from_env(rank))

    def enter(self, phase: Phase, step: int | None = None) -> None:
        if phase == Phase.SYNC and self.faults is not None:
            self.faults.before_sync()
        ended = self.beacon.phase
        lasted = self.beacon.enter(phase, step)
        if ended in BUSY_PHASES:
            self._busy += lasted
        if phase == Phase.SYNC and ended != Phase.SYNC:  # the rank's own work of this step is done
            self._window.append(self._busy)

    def step_begins(self, step: int) -> None:
        self._busy = 0.0
        self.enter(Phase.DATA, step)
        if self.faults is not None:
            self.faults.step_begins(step)

    def straggler_report(self) -> dict:
        """A collective (call it on every rank at a logging step): every rank scores the window since the last
        report the same way and writes its own busy time and flag into its beacon, for the watchdog; rank 0
        gets the metrics fields, the other ranks {}."""
        mine = statistics.median(self._window) if self._window else 0.0
        self._window.clear()
        if self.world_size == 1:
            return {}
        busy = [0.0] * self.world_size
        dist.all_gather_object(busy, mine)
        before = set(self.tracker.flagged)
        record = self.tracker.record(busy)
        self.beacon.report(mine, self.rank in self.tracker.flagged)
        if self.rank != 0:
            return {}
        if self.tracker.flagged != before:
            print(f"[llaunch] stragglers now: {sorted(self.tracker.flagged) or 'none'} (busy s per rank "
                  f"{record['busy_s']}, score {record['straggler_score']})", flush=True)
        return record

    def close(self) -> None:
        self.enter(Phase.DONE)
        self.beacon.close()
        if self._stacks is not None:
            unregister_stack_dump(self._stacks)
