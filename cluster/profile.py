"""Cluster profiles: a site's SLURM defaults (partition, account, GPUs per node, time, requeue policy) as YAML.

`llaunch submit --cluster NAME` reads cluster/profiles/NAME.yaml (or a path); every flag overrides its field.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from launcher.errors import LaunchError

DEFAULT_PROFILE = "local"
_TIME = re.compile(r"^(?:(\d+)-)?(\d{1,2}):(\d{2}):(\d{2})$")


@dataclass
class ClusterProfile:
    name: str = DEFAULT_PROFILE
    local: bool = False
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "01:00:00"
    constraint: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    gpu_name: str = ""
    gpu_mem_gb: float = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None  # sbatch --mem per node (None: the partition's default)
    node_ram_gb: float = 0  # host RAM per node the planner may use (CPU training, offload); 0: the planner's default
    max_requeues: int = 3
    max_restarts: int = 0
    signal_delay_s: int = 90
    dist_timeout_s: int = 300
    setup: list[str] = field(default_factory=list)

    @property
    def time_minutes(self) -> int:
        return time_to_minutes(self.time)

    def replace(self, **changes) -> "ClusterProfile":
        """A copy with the given fields changed; None means "keep the profile's value"."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None}).validate()

    def validate(self) -> "ClusterProfile":
        time_to_minutes(self.time)
        for name in ("nodes", "cpus_per_task"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LaunchError(f"cluster profile {self.name!r}: {name} must be a positive integer.")
        for name in ("gpus_per_node", "max_requeues", "max_restarts", "signal_delay_s", "dist_timeout_s"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise LaunchError(f"cluster profile {self.name!r}: {name} must be a non-negative integer.")
        return self


def time_to_minutes(text: str) -> int:
    """SLURM's [D-]HH:MM:SS as whole minutes (rounded up), the unit submitit takes."""
    match = _TIME.match(str(text))
    if not match:
        raise LaunchError(f"time {text!r} is not HH:MM:SS or D-HH:MM:SS; write e.g. --time 04:00:00.")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return days * 24 * 60 + hours * 60 + minutes + (1 if seconds else 0)


def profile_names() -> list[str]:
    folder = resources.files("cluster").joinpath("profiles")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_profile(name_or_path: str = DEFAULT_PROFILE) -> ClusterProfile:
    """A shipped profile by name, or any profile YAML by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        text = path.read_text() if path.exists() else None
    else:
        entry = resources.files("cluster").joinpath("profiles", f"{name_or_path}.yaml")
        text = entry.read_text() if entry.is_file() else None
    if text is None:
        raise LaunchError(
            f"cluster profile {name_or_path!r} not found; use one of {', '.join(profile_names())} or a path to a YAML file."
        )
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise LaunchError(f"cluster profile {name_or_path} is not valid YAML ({err.__class__.__name__}).") from None
    known = {f.name for f in dataclasses.fields(ClusterProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LaunchError(f"cluster profile {name_or_path} has unknown key(s) {', '.join(unknown)}.")
    return ClusterProfile(**data).validate()
