"""What one node measures about itself: interfaces, versions, the rendezvous port, free space, write speed, GPUs."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import os
import platform
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path

import psutil

import launcher

NCCL_PACKAGES = ("nvidia-nccl-cu13", "nvidia-nccl-cu12", "nvidia-nccl-cu11")  # NCCL as torch's wheels ship it
BANDWIDTH_PROBE_BYTES = 16 * 2**20  # long enough to pass the page cache's first burst, short enough for 60 s


def interfaces(loopback: bool) -> dict[str, str]:
    """Every up interface's IPv4 address by name; loopback only when the nodes' addresses are loopback (one host)."""
    stats = psutil.net_if_stats()
    found = {}
    for name, addrs in psutil.net_if_addrs().items():
        if name not in stats or not stats[name].isup:
            continue
        for addr in addrs:
            if addr.family == socket.AF_INET and ipaddress.ip_address(addr.address).is_loopback == loopback:
                found[name] = addr.address
                break
    return found


def is_loopback(address: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(address).is_loopback
    return False


def _package_version(name: str) -> str | None:
    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version(name)
    return None


def versions() -> dict[str, str | None]:
    """The software every node must agree on, read from package metadata (no import of torch)."""
    nccl = next((v for v in map(_package_version, NCCL_PACKAGES) if v), None)
    return {"python": platform.python_version(), "torch": _package_version("torch"), "llaunch": launcher.__version__,
            "deepspeed": _package_version("deepspeed"), "nccl": nccl}


def config_hash(job_dir) -> str | None:
    """sha256 over the job's plan and config (a launcher.jobdir.layout.JobDir) as this node reads them; None when
    the job dir has neither."""
    digest, found = hashlib.sha256(), False
    for path in (job_dir.plan, job_dir.config):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
            found = True
    return digest.hexdigest()[:16] if found else None


def port_busy(port: int) -> bool:
    """Whether another process listens on `port` here (SO_REUSEADDR: a closed socket's TIME_WAIT is not "busy")."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def resolves(address: str) -> bool:
    try:
        socket.getaddrinfo(address, None, socket.AF_INET)
    except OSError:
        return False
    return True


def nearest_existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())


def free_space(path: Path) -> tuple[int, int | None]:
    """Free bytes and inodes for an unprivileged writer under `path` (inodes None where the filesystem has no count)."""
    stat = os.statvfs(nearest_existing(path))
    return stat.f_bavail * stat.f_frsize, (stat.f_favail if stat.f_files else None)


def write_bandwidth(folder: Path, nbytes: int = BANDWIDTH_PROBE_BYTES) -> float:
    """Bytes per second of a written and fsynced probe file, removed afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".llaunch-doctor-write-{socket.gethostname()}-{os.getpid()}"
    block = os.urandom(2**20)
    start = time.perf_counter()
    try:
        with open(path, "wb") as handle:
            for _ in range(nbytes // len(block)):
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
        return nbytes / max(time.perf_counter() - start, 1e-9)
    finally:
        path.unlink(missing_ok=True)


@dataclass
class GpuHealth:
    """One GPU as NVML reports it; counters NVML does not support on a GPU stay 0. XID errors are not here:
    NVML reports them only as events to a process listening when they happen, not since boot."""

    index: int = 0
    name: str = ""
    memory_total: int = 0
    ecc_uncorrected: int = 0  # volatile (since the driver loaded) uncorrected ECC errors
    retired_pages_pending: bool = False
    remapped_rows_failed: bool = False
    remapped_rows_pending: bool = False
    other_processes: list[int] = field(default_factory=list)  # pids holding memory on it

    @classmethod
    def from_dict(cls, data: dict) -> "GpuHealth":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


def nvml_gpus() -> list[GpuHealth] | None:
    """Each visible GPU's health, or None when there is no NVML (no driver, no GPU)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver: a CPU node
        return None
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            gpu = GpuHealth(index=index, name=str(pynvml.nvmlDeviceGetName(handle)),
                            memory_total=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total))
            with contextlib.suppress(pynvml.NVMLError):
                gpu.ecc_uncorrected = int(pynvml.nvmlDeviceGetTotalEccErrors(
                    handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC))
            with contextlib.suppress(pynvml.NVMLError):
                gpu.retired_pages_pending = bool(pynvml.nvmlDeviceGetRetiredPagesPendingStatus(handle))
            with contextlib.suppress(pynvml.NVMLError):
                _, _, pending, failed = pynvml.nvmlDeviceGetRemappedRows(handle)
                gpu.remapped_rows_pending, gpu.remapped_rows_failed = bool(pending), bool(failed)
            with contextlib.suppress(pynvml.NVMLError):
                gpu.other_processes = [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]
            gpus.append(gpu)
        return gpus
    finally:
        pynvml.nvmlShutdown()
