"""The job dir's layout: the one home of the name of every file and folder at its top level.

A run directory holds everything of one job, and the ranks write nowhere else. Who writes what:
`llaunch run` / `submit` (launcher.jobdir.prepare) the plan and the config; the run lock its holders; rank 0 the
metrics, TensorBoard and the final model; every rank its checkpoint shards; the launcher, the node tasks and
rank 0 the event ledger; the watchdog the hangs and each node's phase durations; the node tasks the rank exits;
the doctor its reports; submitit the nodes' logs; `llaunch submit` the frozen code (cluster.snapshot) and the
node tasks the notify hook's log (cluster.notify). What lies inside a folder (checkpoints/step-N, hangs/TIME-HOST,
rank-exits/ATTEMPT, code/...) is named by the module that writes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class JobDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def plan(self) -> Path:
        return self.root / "plan.yaml"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def lock(self) -> Path:
        return self.root / ".llaunch.lock"

    @property
    def events(self) -> Path:
        """The event ledger (launcher.observe.event_ledger)."""
        return self.root / "events.jsonl"

    @property
    def metrics(self) -> Path:
        """Rank 0's logged steps (launcher.train.metrics), one JSON object a line."""
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        """The final model, in Hugging Face's format (launcher.train.final_model)."""
        return self.root / "final"

    @property
    def hangs(self) -> Path:
        """One folder per hang the watchdog found: its evidence and every rank's stacks."""
        return self.root / "hangs"

    def watchdog_phases(self, host: str) -> Path:
        """The longest each phase took lately on one node ("*": every node's, as a glob)."""
        return self.root / f"watchdog-phases-{host}.json"

    @property
    def rank_exits(self) -> Path:
        """When each node's ranks ended, per attempt (launcher.runtime.rank_exits)."""
        return self.root / "rank-exits"

    @property
    def doctor(self) -> Path:
        """The doctor's report of each node (cluster.doctor.node)."""
        return self.root / "doctor"

    @property
    def doctor_logs(self) -> Path:
        """submitit's logs of the doctor's own SLURM job (`llaunch doctor --nodes`)."""
        return self.doctor / "slurm"

    @property
    def slurm(self) -> Path:
        """submitit's folder for a submitted job: its pickles and each node's logs, appended across requeues."""
        return self.root / "slurm"

    @property
    def code(self) -> Path:
        """What a submitted job imports, frozen at submit time (cluster.snapshot): every node and requeue runs it."""
        return self.root / "code"

    @property
    def notify_log(self) -> Path:
        """One JSON line per run of the job's notify hook (cluster.notify): its state, exit and output."""
        return self.root / "notify.jsonl"
