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
from launcher.runtime.watchdog_config import check_settings

DEFAULT_PROFILE = "local"
_TIME = re.compile(r"^(?:(\d+)-)?(\d{1,2}):(\d{2}):(\d{2})$")
PYXIS, APPTAINER = "pyxis", "apptainer"  # pyxis: the whole srun step in the image; apptainer: torchrun in it


@dataclass(frozen=True)
class Container:
    """The image a job's nodes run in (cluster.submission renders it). mounts: "SRC:DST" or "SRC:DST:ro", both
    absolute; the job dir, llaunch's source and the token cache are mounted without being listed."""

    image: str
    runtime: str = PYXIS
    mounts: tuple[str, ...] = ()
    workdir: str | None = None  # the directory inside the image the command starts in (None: the runtime's)
    python: str = "python3"  # the image's interpreter; it needs llaunch's requirements (torch, submitit, ...)

    @classmethod
    def from_profile(cls, data, where: str) -> "Container":
        """The profile's `container:` mapping, every value checked: each bad one is refused naming its key."""
        def refuse(key: str, what: str) -> None:
            raise LaunchError(f"{where}{key} must be {what}.")

        if not isinstance(data, dict) or not set(data) <= {f.name for f in dataclasses.fields(cls)}:
            refuse("", "a mapping of image, runtime, mounts, workdir and python, e.g. {image: /images/train.sqsh}")
        for key in ("image", "runtime", "python", "workdir"):
            value = data.get(key)
            if (value is not None or key == "image") and (not isinstance(value, str) or not _one_line(value)):
                refuse(f".{key}", "a non-empty value on one line")
        if data.get("runtime", PYXIS) not in (PYXIS, APPTAINER):
            refuse(".runtime", f"{PYXIS} or {APPTAINER}, not {data['runtime']!r}")
        if data.get("workdir") is not None and not data["workdir"].startswith("/"):
            refuse(".workdir", f"an absolute path inside the image, not {data['workdir']!r}")
        mounts = data.get("mounts") or []
        if not isinstance(mounts, list) or not all(isinstance(m, str) and _mount(m) for m in mounts):
            refuse(".mounts", f"a list of SRC:DST or SRC:DST:ro with absolute paths and no comma, not {mounts!r}")
        return cls(**{**data, "mounts": tuple(mounts)})


def _one_line(text: str) -> bool:
    return bool(text.strip()) and not any(ch in text for ch in "\n\r\0")


def _mount(text: str) -> bool:
    """SRC:DST[:ro], both absolute: a relative source would be resolved on each node, a comma splits pyxis's list."""
    parts = text.split(":")
    return (_one_line(text) and "," not in text and len(parts) in (2, 3) and all(p.startswith("/") for p in parts[:2])
            and parts[2:] in ([], ["ro"]))


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
    min_nodes: int | None = None  # the fewest nodes the job may run on (sbatch --nodes=MIN-MAX); None: all
    gpus_per_node: int = 0
    gpu_name: str = ""
    gpu_mem_gb: float = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None  # sbatch --mem per node (None: the partition's default)
    node_ram_gb: float = 0  # host RAM per node the planner may use (CPU training, offload); required
    # The interconnect the planner times collectives on (null: the GPU type's datasheet NVLink, and gpus.json's
    # typical network of 400 Gb/s per GPU): NVLink GB/s per GPU in one direction, the node's NICs and their Gb/s.
    nvlink_gb_per_s: float | None = None
    nics_per_node: int | None = None
    nic_gbit_per_s: float | None = None
    max_requeues: int = 3
    # Restarts inside one allocation: with spare_nodes, new srun steps on the healthy nodes (cluster.restart);
    # without, torchrun's restarts of the ranks on the same nodes.
    max_restarts: int = 0
    spare_nodes: int = 0  # nodes allocated beyond `nodes`, each ready to take a failed node's place
    signal_delay_s: int = 90
    dist_timeout_s: int = 300
    setup: list[str] = field(default_factory=list)
    doctor: bool = True  # `llaunch doctor`'s checks before torchrun in every incarnation of a submitted job
    watchdog: dict = field(default_factory=dict)  # WatchdogConfig keys; a job's supervision.watchdog wins
    container: Container | None = None  # the image the nodes run the job in (None: the nodes' own software)
    notify: str | None = None  # a shell command run on each change of the job's state (cluster.notify)

    @property
    def time_minutes(self) -> int:
        return time_to_minutes(self.time)

    @property
    def allocation_nodes(self) -> int:
        """The nodes sbatch asks for: the job's and its spares."""
        return self.nodes + self.spare_nodes

    @property
    def restarts_on_spares(self) -> bool:
        """Whether a failed node is replaced by a spare in a new step (else torchrun restarts the ranks in place)."""
        return self.spare_nodes > 0

    @property
    def torchrun_restarts(self) -> int:
        """torchrun's --max-restarts: the ranks restarted on the same nodes, unless spares replace a failed node."""
        return 0 if self.restarts_on_spares else self.max_restarts

    def hardware(self):
        """The nodes the planner plans for under this profile: its GPUs and RAM, not the login node's."""
        from launcher.planning.hardware import Hardware, gpu_node

        ram = int(self.node_ram_gb * 2**30)
        if self.gpus_per_node:
            network = self.nics_per_node * self.nic_gbit_per_s * 1e9 / 8 / self.gpus_per_node if self.nics_per_node else 0
            return gpu_node(self.gpu_name, self.gpus_per_node, self.nodes, int(self.gpu_mem_gb * 2**30), ram,
                            self.cpus_per_task, (self.nvlink_gb_per_s or 0) * 1e9, network)
        return Hardware(nodes=self.nodes, cpu_cores=self.cpus_per_task, ram_bytes=ram)

    def replace(self, **changes) -> "ClusterProfile":
        """A copy with the given fields changed; None means "keep the profile's value"."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes).validate(flags=set(changes))

    def validate(self, flags: set[str] = frozenset()) -> "ClusterProfile":
        """Every field's type and range; `flags` names the fields set by command-line flags, so the error
        points at the flag instead of the profile."""
        def refuse(name: str, what: str) -> None:
            where = f"--{name.replace('_', '-')}" if name in flags else f"cluster profile {self.name!r}: {name}"
            raise LaunchError(f"{where} must be {what}.")

        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for name in ("nodes", "cpus_per_task", "dist_timeout_s"):  # 0 s: every collective times out at once
            if not integer(getattr(self, name)) or getattr(self, name) < 1:
                refuse(name, "a positive integer")
        if self.min_nodes is not None and (not integer(self.min_nodes) or not 1 <= self.min_nodes <= self.nodes):
            refuse("min_nodes", f"an integer from 1 to the job's nodes ({self.nodes})")
        for name in ("gpus_per_node", "max_requeues", "max_restarts", "spare_nodes", "signal_delay_s"):
            if not integer(getattr(self, name)) or getattr(self, name) < 0:
                refuse(name, "a non-negative integer")
        self._validate_spares(refuse)
        for name in ("partition", "account", "qos", "constraint"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                refuse(name, "a name (text) or null")
        if not number(self.node_ram_gb) or self.node_ram_gb <= 0:
            refuse("node_ram_gb", "the host RAM of one node in GB (a positive number; the planner sizes CPU "
                                  "training and offload with it)")
        if not number(self.gpu_mem_gb) or self.gpu_mem_gb < 0 or (self.gpus_per_node and not self.gpu_mem_gb):
            refuse("gpu_mem_gb", "the memory of one GPU in GB (a positive number when gpus_per_node is set)")
        if self.mem_gb is not None and (not number(self.mem_gb) or self.mem_gb <= 0):
            refuse("mem_gb", "a positive number of GB or null (the partition's default)")
        self._validate_interconnect(refuse, number, integer)
        if not isinstance(self.watchdog, dict):
            refuse("watchdog", "a mapping of the watchdog's keys, e.g. {floor_s: 60}")
        check_settings(self.watchdog, f"cluster profile {self.name!r}: watchdog")
        if not isinstance(self.doctor, bool):
            refuse("doctor", "true or false")
        if self.notify is not None and not (isinstance(self.notify, str) and _one_line(self.notify)):
            refuse("notify", "a shell command on one line, e.g. \"$HOME/bin/notify.sh\"")
        if not isinstance(self.setup, list) or not all(isinstance(line, str) for line in self.setup):
            refuse("setup", "a list of shell lines, e.g. [\"module load cuda\"]")
        self._validate_time(refuse)
        return self

    def _validate_spares(self, refuse) -> None:
        """Spares need restarts to use them, and a job that may shrink (min_nodes) has no node count to keep."""
        if self.spare_nodes and self.max_restarts < 1:
            refuse("max_restarts", f"at least 1 with {self.spare_nodes} spare node(s) (each restart puts a spare in a "
                                   f"failed node's place), e.g. --max-restarts {self.spare_nodes}")
        if self.spare_nodes and self.min_nodes is not None and self.min_nodes < self.nodes:
            refuse("spare_nodes", "0 when min_nodes lets the job shrink (it goes on without the failed node instead); "
                                  "drop --min-nodes or --spare-nodes")

    def _validate_time(self, refuse) -> None:
        """The time limit as SLURM reads it, longer than the preemption warning."""
        try:
            minutes = self.time_minutes
        except LaunchError:
            refuse("time", "[D-]HH:MM:SS with minutes and seconds below 60 (and hours below 24 after a day count), "
                           "e.g. 04:00:00")
        # SLURM may send the warning up to 60 s before signal_delay_s says (its event resolution).
        if minutes * 60 <= self.signal_delay_s + 60:
            least = (self.signal_delay_s + 60) // 60 + 2
            refuse("time", f"longer than the preemption warning (signal_delay_s {self.signal_delay_s} s, which SLURM "
                           f"may send up to 60 s early), e.g. {least // 60:02d}:{least % 60:02d}:00")

    def _validate_interconnect(self, refuse, number, integer) -> None:
        """NVLink GB/s and the NICs: positive numbers or null, the NIC count and rate given together."""
        if self.nvlink_gb_per_s is not None and (not number(self.nvlink_gb_per_s) or self.nvlink_gb_per_s <= 0):
            refuse("nvlink_gb_per_s", "NVLink GB/s per GPU in one direction (a positive number, e.g. 450 for H100 "
                                      "SXM) or null (the GPU's datasheet)")
        if self.nics_per_node is not None and (not integer(self.nics_per_node) or self.nics_per_node < 1):
            refuse("nics_per_node", "the network cards of one node (a positive integer, e.g. 8) or null")
        if self.nic_gbit_per_s is not None and (not number(self.nic_gbit_per_s) or self.nic_gbit_per_s <= 0):
            refuse("nic_gbit_per_s", "one network card's rate in Gb/s (a positive number, e.g. 400) or null")
        if (self.nics_per_node is None) != (self.nic_gbit_per_s is None):
            refuse("nics_per_node", "given with nic_gbit_per_s (both, or neither for the typical 400 Gb/s per GPU)")


def time_to_minutes(text: str) -> int:
    """SLURM's [D-]HH:MM:SS as whole minutes (rounded up), the unit submitit takes."""
    match = _TIME.match(str(text))
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups()) if match else (0, 0, 0, 0)
    if not match or minutes > 59 or seconds > 59 or (match.group(1) is not None and hours > 23):
        raise LaunchError(f"time {text!r} is not HH:MM:SS or D-HH:MM:SS (minutes and seconds below 60, hours below "
                          f"24 after a day count); write e.g. --time 04:00:00.")
    return days * 24 * 60 + hours * 60 + minutes + (1 if seconds else 0)


def profile_names() -> list[str]:
    folder = resources.files("cluster").joinpath("profiles")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_profile(name_or_path: str = DEFAULT_PROFILE) -> ClusterProfile:
    """A shipped profile by name, or any profile YAML by path."""
    path = Path(name_or_path)
    entry = path if path.suffix in (".yaml", ".yml") else resources.files("cluster").joinpath("profiles", f"{name_or_path}.yaml")
    if isinstance(entry, Path) and entry.exists() and not (entry.is_file() or entry.is_dir()):
        raise LaunchError(f"cluster profile {name_or_path} is not a regular file (a FIFO or a device would block "
                          f"or never end); pass a profile YAML.")
    try:
        data = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise LaunchError(
            f"cluster profile {name_or_path!r} not found; use one of {', '.join(profile_names())} or a path to a YAML file."
        ) from None
    except UnicodeDecodeError:
        raise LaunchError(f"cluster profile {name_or_path} is not UTF-8 text; pass a profile YAML.") from None
    except (OSError, ValueError) as err:  # a directory, an unreadable file, a NUL in the path
        raise LaunchError(f"cannot read cluster profile {name_or_path} ({err.strerror or err}); pass a profile "
                          f"YAML.") from None
    except yaml.YAMLError as err:
        raise LaunchError(f"cluster profile {name_or_path} is not valid YAML ({err.__class__.__name__}).") from None
    if not isinstance(data, dict):
        raise LaunchError(f"cluster profile {name_or_path} must be a mapping of keys to values, like "
                          f"cluster/profiles/local.yaml.")
    known = {f.name for f in dataclasses.fields(ClusterProfile)}
    unknown = sorted(map(str, set(data) - known))
    if unknown:
        raise LaunchError(f"cluster profile {name_or_path} has unknown key(s) {', '.join(unknown)}.")
    if data.get("container") is not None:
        data["container"] = Container.from_profile(data["container"],
                                                   f"cluster profile {data.get('name', name_or_path)!r}: container")
    return ClusterProfile(**data).validate()
