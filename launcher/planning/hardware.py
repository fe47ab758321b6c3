"""What we are running on: GPUs via NVML, CPU and RAM via psutil, and the SLURM allocation if inside one.

The one place that reads the environment; everything else gets a Hardware. No GPU, no driver or no NVML
is a normal answer (an empty GPU list with the reason), never an error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from launcher.errors import LaunchError

GPU_DATA = Path(__file__).parent / "data" / "gpus.json"
NVLINK_MAX_LINKS = 18  # NVML_NVLINK_MAX_LINKS on Hopper
ASSUMED_NODE_RAM = 2 * 1024**4  # host RAM of a GPU node we cannot probe (DGX H100: 2 TB); bounds CPU offload
DEFAULT_GPU = "H100"  # the GPU a plan is for when GPUs are asked for but none is named: today's common training card
SINFO_FORMAT = "%P|%G|%f|%D|%m|%c"  # partition (* = default) | Gres | features | nodes | MB RAM per node | CPUs per node
SINFO_TIMEOUT_S = 3  # a login node's slurmctld answers in milliseconds; a broken config must not stall `plan`


@dataclass
class GPUFacts:
    """Datasheet numbers for one GPU model (see launcher/planning/data/gpus.json for the sources)."""

    key: str
    memory_bytes: int
    peak_flops: dict[str, float]
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float
    pcie_bytes_per_s: float
    source: str


@dataclass
class GPU:
    index: int
    name: str
    memory_total: int
    memory_free: int
    compute_capability: str
    nvlink_links: int = 0


@dataclass
class SlurmAllocation:
    job_id: str
    nodes: int
    gpus_per_node: int | None
    nodelist: str = ""


@dataclass
class Hardware:
    """A (possibly multi-node) machine description; probe() fills it here, flags describe one elsewhere."""

    gpus: list[GPU] = field(default_factory=list)
    nodes: int = 1
    driver: str = ""
    nvml_error: str = ""
    cpu_cores: int = 1
    ram_bytes: int = 0
    ram_available_bytes: int = 0
    hostname: str = ""
    slurm: SlurmAllocation | None = None
    # Set when flags describe GPUs we cannot see (--gpu/--gpu-mem/--gpus-per-node); otherwise from `gpus`.
    gpu_name_override: str = ""
    gpu_mem_override: int = 0
    gpus_per_node_override: int = 0
    # A cluster profile's interconnect (bytes/s in one direction, per GPU); 0: the GPU type's datasheet NVLink
    # and gpus.json's typical network.
    nvlink_bytes_per_s_override: float = 0
    network_bytes_per_s_override: float = 0

    @property
    def gpus_per_node(self) -> int:
        return self.gpus_per_node_override or len(self.gpus)

    @property
    def gpu_name(self) -> str:
        return self.gpu_name_override or (self.gpus[0].name if self.gpus else "")

    @property
    def gpu_mem_bytes(self) -> int:
        """Usable memory per GPU: the smallest total among visible GPUs (ranks are symmetric)."""
        if self.gpu_mem_override:
            return self.gpu_mem_override
        if self.gpus:
            return min(g.memory_total for g in self.gpus)
        facts = gpu_facts(self.gpu_name) if self.gpu_name else None
        return int(facts.memory_bytes) if facts else 0

    @property
    def has_gpu(self) -> bool:
        return self.gpus_per_node > 0

    def node_link_bytes_per_s(self, facts: "GPUFacts") -> float:
        """One GPU's link to the others of its node: the profile's NVLink figure, else the datasheet's, or PCIe
        where the GPU has no NVLink (L40S)."""
        if self.nvlink_bytes_per_s_override:
            return self.nvlink_bytes_per_s_override
        return facts.nvlink_bytes_per_s if self.nvlink and facts.nvlink_bytes_per_s else facts.pcie_bytes_per_s

    @property
    def network_bytes_per_s(self) -> float:
        """One GPU's share of its node's network: the profile's NICs x rate / GPUs, else gpus.json's typical one."""
        return self.network_bytes_per_s_override or float(_gpu_table()["network"]["inter_node_bytes_per_s_per_gpu"])

    @property
    def nvlink(self) -> bool:
        """Intra-node collectives ride NVLink when the probe saw links, or the datasheet has them for a named GPU."""
        if self.gpus and not self.gpu_name_override:
            return all(g.nvlink_links > 0 for g in self.gpus)
        facts = gpu_facts(self.gpu_name)
        return bool(facts and facts.nvlink_bytes_per_s > 0)

    @property
    def facts(self) -> GPUFacts | None:
        return gpu_facts(self.gpu_name) if self.gpu_name else None

    def to_dict(self) -> dict:
        from dataclasses import asdict

        data = asdict(self)
        for name in ("gpu_name_override", "gpu_mem_override", "gpus_per_node_override"):
            data.pop(name)
        data.update(gpus_per_node=self.gpus_per_node, gpu_name=self.gpu_name, gpu_mem_bytes=self.gpu_mem_bytes,
                    nvlink=self.nvlink if self.has_gpu else False)
        return data


@lru_cache(maxsize=1)
def _gpu_table() -> dict:
    return json.loads(GPU_DATA.read_text())


@dataclass
class PartitionGPUs:
    """One SLURM partition's GPU nodes as `sinfo` describes them (the most common node type when mixed)."""

    partition: str
    default: bool
    gpus_per_node: int
    gpu_name: str  # a gpus.json key, or "" when neither the Gres type nor the features name a known GPU
    nodes: int
    ram_bytes: int
    cpus: int


def gpu_node(gpu_name: str, gpus_per_node: int, nodes: int = 1, gpu_mem_bytes: int = 0, ram_bytes: int = 0,
             cpu_cores: int = 1, nvlink_bytes_per_s: float = 0, network_bytes_per_s: float = 0) -> Hardware:
    """GPU nodes we are not on (flags, a cluster profile, a SLURM partition): datasheet memory and links unless told."""
    facts = require_gpu_name(gpu_name)
    return Hardware(nodes=nodes, cpu_cores=cpu_cores, ram_bytes=ram_bytes or ASSUMED_NODE_RAM,
                    gpu_name_override=facts.key, gpu_mem_override=gpu_mem_bytes or facts.memory_bytes,
                    gpus_per_node_override=gpus_per_node, nvlink_bytes_per_s_override=nvlink_bytes_per_s,
                    network_bytes_per_s_override=network_bytes_per_s)


def login_node_partition(partition: str | None = None) -> PartitionGPUs | None:
    """The GPUs of `partition` (default: SLURM's default one) seen from a login node; None without SLURM or GPUs."""
    if shutil.which("sinfo") is None:
        return None
    argv = ["sinfo", "--noheader", "--format", SINFO_FORMAT] + (["--partition", partition] if partition else [])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=SINFO_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return pick_partition(parse_sinfo(done.stdout), partition)


def parse_sinfo(text: str) -> list[PartitionGPUs]:
    """Lines of `sinfo --format SINFO_FORMAT` -> one entry per partition and node type that has GPUs."""
    out = []
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 6:
            continue
        name, gres, features, nodes, ram_mb, cpus = fields
        match = re.search(r"\bgpu(?::([^:,(\s]+))?:(\d+)", gres)  # gpu:8, gpu:h100:8(S:0-1), gpu:a100:4,shard:16
        if match is None or not int(match.group(2)):
            continue
        kind, count = match.group(1) or "", int(match.group(2))
        described = " ".join([kind, *features.replace("(null)", "").split(",")])
        facts = gpu_facts(described) if described.strip() else None
        out.append(PartitionGPUs(
            partition=name.rstrip("*"), default=name.endswith("*"), gpus_per_node=count,
            gpu_name=facts.key if facts else "", nodes=_leading_int(nodes), ram_bytes=_leading_int(ram_mb) * 2**20,
            cpus=_leading_int(cpus) or 1,
        ))
    return out


def pick_partition(entries: list[PartitionGPUs], partition: str | None) -> PartitionGPUs | None:
    """The named partition, else SLURM's default one, else the largest GPU partition; its most common node type."""
    named = [e for e in entries if e.partition == partition] if partition else [e for e in entries if e.default]
    if not named and not partition:
        named = entries
    return max(named, key=lambda e: (e.nodes, e.gpus_per_node), default=None)


def _leading_int(text: str) -> int:
    """sinfo's '4000+' (mixed nodes: the smallest, then '+') -> 4000; 'N/A' -> 0."""
    match = re.match(r"\d+", text.strip())
    return int(match.group()) if match else 0


def gpu_facts(name: str) -> GPUFacts | None:
    """Datasheet facts for an NVML device name or a short name (H100, a100-40gb); None when unknown."""
    lowered = name.lower().replace("-", " ").replace("_", " ")
    for entry in _gpu_table()["gpus"]:
        if any(all(word in lowered for word in words) for words in entry["match"]) or lowered == entry["key"].lower().replace("-", " "):
            return GPUFacts(
                key=entry["key"], memory_bytes=int(entry["memory_bytes"]),
                peak_flops={p: float(entry[p]) for p in ("fp8", "bf16", "fp16", "tf32", "fp32")},
                hbm_bytes_per_s=float(entry["hbm_bytes_per_s"]), nvlink_bytes_per_s=float(entry["nvlink_bytes_per_s"]),
                pcie_bytes_per_s=float(entry["pcie_bytes_per_s"]), source=entry["source"],
            )
    return None


def known_gpu_names() -> list[str]:
    return [e["key"] for e in _gpu_table()["gpus"]]


def probe() -> Hardware:
    import psutil

    memory = psutil.virtual_memory()
    hardware = Hardware(
        cpu_cores=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        ram_bytes=int(memory.total), ram_available_bytes=int(memory.available),
        hostname=socket.gethostname(), slurm=_slurm_allocation(),
    )
    hardware.gpus, hardware.driver, hardware.nvml_error = _probe_gpus()
    if hardware.slurm is not None:
        hardware.nodes = hardware.slurm.nodes
    return hardware


def _probe_gpus() -> tuple[list[GPU], str, str]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as err:  # no library, no driver, no device: all mean "no NVIDIA GPU here"
        return [], "", f"NVML unavailable ({err.__class__.__name__}: {err})"
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        visible = _visible_indices(pynvml.nvmlDeviceGetCount())
        gpus = []
        for index in visible:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(GPU(
                index=index, name=name.decode() if isinstance(name, bytes) else name,
                memory_total=int(memory.total), memory_free=int(memory.free),
                compute_capability=f"{major}.{minor}", nvlink_links=_active_nvlinks(pynvml, handle),
            ))
        return gpus, driver, ""
    finally:
        pynvml.nvmlShutdown()


def _visible_indices(count: int) -> list[int]:
    """Honour CUDA_VISIBLE_DEVICES when it lists indices (what torch will see)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not re.fullmatch(r"[0-9, ]*", visible):
        return list(range(count))
    return [int(v) for v in visible.split(",") if v.strip() and int(v) < count]


def _active_nvlinks(pynvml, handle) -> int:
    active = 0
    for link in range(NVLINK_MAX_LINKS):
        try:
            active += int(pynvml.nvmlDeviceGetNvLinkState(handle, link) == pynvml.NVML_FEATURE_ENABLED)
        except pynvml.NVMLError:
            break  # no such link (or no NVLink at all on this board)
    return active


def _slurm_allocation() -> SlurmAllocation | None:
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    nodes_value = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or "1"
    if not nodes_value.isdigit() or int(nodes_value) < 1:
        raise LaunchError(f"SLURM_JOB_ID is set but the allocation's node count is {nodes_value!r}, not a positive "
                          f"integer; run inside a real SLURM allocation or unset SLURM_JOB_ID.")
    nodes = int(nodes_value)
    gpus = os.environ.get("SLURM_GPUS_ON_NODE") or os.environ.get("SLURM_GPUS_PER_NODE") or ""
    match = re.search(r"(\d+)\s*$", gpus)  # "4" or "h100:4"
    return SlurmAllocation(job_id=job, nodes=nodes, gpus_per_node=int(match.group(1)) if match else None,
                           nodelist=os.environ.get("SLURM_JOB_NODELIST", ""))


def require_gpu_name(name: str) -> GPUFacts:
    facts = gpu_facts(name)
    if facts is None:
        raise LaunchError(f"unknown GPU {name!r}; use one of {', '.join(known_gpu_names())} or give --gpu-mem.")
    return facts
