"""Fault hooks for tests, off by default: each environment variable makes the doctor meet a real fault.

    LLAUNCH_DOCTOR_FAULT_PORT=1             the first node holds the rendezvous port while it checks it
    LLAUNCH_DOCTOR_FAULT_LOCAL_STORAGE=1    every node checks a node-local directory instead of the job dir
    LLAUNCH_DOCTOR_FAULT_VERSION=N:PKG=VER  node N (0-based index, or the host's SLURM name) reports version VER
                                            for PKG (python, torch, ...)
    LLAUNCH_DOCTOR_FAULT_NVML=JSON          the GPUs' health as a JSON list of probes.GpuHealth fields,
                                            instead of NVML's (e.g. '[{"ecc_uncorrected": 2}]')
    LLAUNCH_DOCTOR_FAULT_MIN_FREE_BYTES=B   the space check needs at least B free bytes
    LLAUNCH_DOCTOR_FAULT_LATE=N:S           node N (as for VERSION) reaches the all-reduce S seconds after its
                                            other checks, as a slow or loaded node does

SLURM passes the submitting shell's environment to every node, so one variable reaches the whole job.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from launcher.env import DOCTOR_FAULT
from launcher.errors import LaunchError

PREFIX = DOCTOR_FAULT.name


@dataclass
class Faults:
    occupy_port: bool = False
    local_storage: bool = False
    version: tuple[str, str, str] | None = None  # (node index or host, package, version)
    nvml: list[dict] | None = None
    min_free_bytes: int = 0
    late: tuple[str, float] | None = None  # (node index or host, seconds)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Faults":
        env = os.environ if env is None else env
        faults = cls(occupy_port=env.get(PREFIX + "PORT") == "1",
                     local_storage=env.get(PREFIX + "LOCAL_STORAGE") == "1")
        try:
            if env.get(PREFIX + "VERSION"):
                node, pair = env[PREFIX + "VERSION"].split(":", 1)
                package, version = pair.split("=", 1)
                if not node or not package:
                    raise ValueError(f"{env[PREFIX + 'VERSION']!r} names no node or no package")
                faults.version = (node, package, version)
            if env.get(PREFIX + "NVML"):
                faults.nvml = json.loads(env[PREFIX + "NVML"])
                if not isinstance(faults.nvml, list) or not all(isinstance(g, dict) for g in faults.nvml):
                    raise ValueError("not a list of objects")
            faults.min_free_bytes = int(env.get(PREFIX + "MIN_FREE_BYTES") or 0)
            if env.get(PREFIX + "LATE"):
                node, seconds = env[PREFIX + "LATE"].split(":", 1)
                faults.late = (node, float(seconds))
        except ValueError as err:
            raise LaunchError(f"a {PREFIX}* variable is malformed ({err}); see cluster/doctor/faults.py "
                              f"for their form, or unset them.") from None
        return faults

    def late_on(self, node: int, host: str) -> float:
        """Seconds this node is made to wait before the all-reduce (0: none)."""
        return self.late[1] if self.late and self.late[0] in (str(node), host) else 0.0

    def version_on(self, node: int, host: str) -> dict[str, str]:
        """The package version this node is made to report, as {package: version} (empty: none)."""
        if self.version and self.version[0] in (str(node), host):
            return {self.version[1]: self.version[2]}
        return {}
