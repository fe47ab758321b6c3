"""A sweep's directory: the one owner of its names, and its record (`llaunch submit --sweep`, launcher.sweep).

A sweep dir holds one job dir per element (launcher.jobdir.layout.JobDir, named by the element's values), the
record that lists them and the SLURM job array they run as, and submitit's folder of the array (the elements'
pickles and logs, `<array>_<task>_<node>_log.out`). The record is written before anything else, so a sweep dir
is recognisable as one from its first file on; `llaunch status` and `cancel` read it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from launcher.errors import LaunchError
from launcher.files import write_text_atomic
from launcher.jobdir.layout import JobDir


@dataclass(frozen=True)
class SweepDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def record(self) -> Path:
        """The sweep's record (SweepRecord): its elements and the array they run as."""
        return self.root / "sweep.json"

    @property
    def slurm(self) -> Path:
        """submitit's folder for the whole array, as a job dir's is for its job."""
        return JobDir(self.root).slurm

    def element(self, name: str) -> Path:
        """The job dir of one element."""
        return self.root / name

    @property
    def is_sweep(self) -> bool:
        return self.record.is_file()


@dataclass(frozen=True)
class SweepElement:
    """One point of the grid: its name (its job dir's) and the `section.key=value` overrides that make it."""

    name: str
    overrides: tuple[str, ...]

    @property
    def label(self) -> str:
        return " ".join(self.overrides)


@dataclass
class SweepRecord:
    """What `llaunch submit --sweep` wrote; array_job_id is "" until sbatch has answered. Element i runs as
    array task i (submitit's submit_array keeps the order), so `<array_job_id>_<i>` is its SLURM id."""

    name: str
    cluster: str
    elements: list[SweepElement]
    array_job_id: str = ""
    submitted_at: float = field(default_factory=time.time)

    def element_job_id(self, index: int) -> str:
        return f"{self.array_job_id}_{index}"

    def save(self, sweep_dir: SweepDir) -> Path:
        return write_text_atomic(sweep_dir.record, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, sweep_dir: SweepDir) -> "SweepRecord":
        """The record, checked in this one place: a damaged one is one sentence, not a traceback."""
        try:
            data = json.loads(sweep_dir.record.read_text())
            elements = [SweepElement(str(e["name"]), tuple(str(o) for o in e["overrides"]))
                        for e in data.pop("elements")]
            record = cls(**data, elements=elements)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            raise LaunchError(f"the sweep record {sweep_dir.record} cannot be read ({err.__class__.__name__}: "
                              f"{err}); it is written by `llaunch submit --sweep`, resubmit the sweep.") from None
        texts = (record.name, record.cluster, record.array_job_id)
        if not record.elements or not all(isinstance(text, str) for text in texts):
            raise LaunchError(f"the sweep record {sweep_dir.record} is damaged; resubmit the sweep.")
        return record
