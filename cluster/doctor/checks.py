"""Each check's verdict from what the nodes measured: ok / warn / FAIL / skip and one sentence that says what
to do. Pure functions of plain values, so every rule is unit-tested without a network, a disk or a GPU."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from cluster.doctor.probes import GpuHealth
from launcher.units import format_bytes

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
CLOCK_SKEW_WARN_S = 1.0
IFNAME_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
GPU_MEMORY_TOLERANCE = 0.98  # NVML's total is a little under the marketed size the plan may carry
# The checks whose failure is the host's own (its software, GPUs, mount of the shared dir, network interfaces,
# clock): only these go into the node ledger. A taken rendezvous port and too little space on the shared dir
# are the job's; a failed all-reduce cannot tell which side of the pair is at fault (a taken port on the first
# node fails it on every node).
HOST_CHECKS = ("software", "gpus", "storage", "interfaces", "clock")


@dataclass
class Check:
    name: str
    status: str
    sentence: str
    data: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def rendezvous(address: str, port: int, *, resolves: bool, reach_error: str | None, port_busy: bool | None,
               first_node_addr: str, first_host: str) -> Check:
    """The first node's address resolves and answers from here; its port is free; everyone uses its NodeAddr."""
    where = f"{address}:{port}"
    if not resolves:
        return Check("rendezvous", FAIL, f"the first node's address {address} does not resolve here; fix DNS or "
                                         f"/etc/hosts, or SLURM's NodeAddr of {first_host}.")
    if reach_error:
        return Check("rendezvous", FAIL, f"this node cannot reach the first node at {address} ({reach_error}); "
                                         f"open TCP between the nodes or set NodeAddr of {first_host} to an "
                                         f"address they share.")
    if address != first_node_addr:
        return Check("rendezvous", FAIL, f"this node would rendezvous at {address} but the first node's NodeAddr "
                                         f"is {first_node_addr}; give every node the same slurm.conf.")
    if port_busy:
        return Check("rendezvous", FAIL, f"port {port} is taken on the first node ({first_host}); end what listens "
                                         f"there (`ss -ltnp 'sport = :{port}'`) or resubmit, which moves the port.")
    return Check("rendezvous", OK, f"{where} resolves and answers" + (", port free" if port_busy is False else ""))


def interfaces(reach: dict[str, list[str]], preset: dict[str, str]) -> tuple[Check, dict[str, str]]:
    """`reach` maps each interface name the nodes serve on to the peers this node did not reach at their
    address on it (or that lack it); when only some reach every peer, the job is pinned to those names (the
    environment returned: NCCL and gloo take interface names, the same on every node of a uniform cluster),
    unless the user pinned it already."""
    if not reach:
        return Check("interfaces", SKIP, "no other node to reach"), {}
    good = sorted(name for name, missed in reach.items() if not missed)
    bad = {name: missed for name, missed in sorted(reach.items()) if missed}
    data = {"reach_all": good, "unreached": bad}
    if not bad:
        return Check("interfaces", OK, f"{', '.join(good)} reach every node", data), {}
    missed = "; ".join(f"{name} does not reach {', '.join(peers)}" for name, peers in bad.items())
    if not good:
        return Check("interfaces", FAIL, f"no interface reaches every node ({missed}); fix the routes or "
                                         f"firewall between the nodes.", data), {}
    if any(preset.get(var) for var in IFNAME_VARIABLES):
        pinned = ", ".join(f"{var}={preset[var]}" for var in IFNAME_VARIABLES if preset.get(var))
        return Check("interfaces", WARN, f"{missed}; kept your {pinned} (interfaces that reach all: "
                                         f"{', '.join(good)}).", data), {}
    env = {var: ",".join(good) for var in IFNAME_VARIABLES}
    return Check("interfaces", WARN, f"{missed}; the job uses {', '.join(good)} "
                                     f"(GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME set).", data), env


def storage(path: str, *, first: bool, seen: bool, first_host: str) -> Check:
    """The first node's nonce file in the job dir is read by every node: one filesystem for checkpoints."""
    if first:
        return Check("storage", OK, f"wrote the nonce into {path}")
    if seen:
        return Check("storage", OK, f"reads the first node's nonce in {path}")
    return Check("storage", FAIL, f"this node does not see the file {first_host} wrote in {path}; put the output "
                                  f"dir on storage every node mounts (not a node-local disk).")


def space(path: str, *, free_bytes: int, free_inodes: int | None, need_bytes: int, need_inodes: int,
          why: str, bandwidth: float | None) -> Check:
    """Free bytes and inodes cover every checkpoint kept plus the export; the write speed is kept for cadence."""
    data = {"free_bytes": free_bytes, "free_inodes": free_inodes, "need_bytes": need_bytes,
            "need_inodes": need_inodes, "write_bytes_per_s": bandwidth}
    speed = f", writes {format_bytes(bandwidth)}/s" if bandwidth else ""
    if free_bytes < need_bytes:
        return Check("space", FAIL, f"{path} has {format_bytes(free_bytes)} free but the run needs "
                                    f"{format_bytes(need_bytes)} ({why}); free space, lower "
                                    f"training.save_total_limit or choose another output dir.", data)
    if free_inodes is not None and free_inodes < need_inodes:
        return Check("space", FAIL, f"{path} has {free_inodes} free inodes but the run writes about "
                                    f"{need_inodes} files; delete files there or choose another output dir.", data)
    return Check("space", OK, f"{format_bytes(free_bytes)} free, {format_bytes(need_bytes)} needed ({why}){speed}", data)


def software(mine: dict[str, str | None], first: dict[str, str | None], first_host: str) -> Check:
    """Same python, torch, llaunch, deepspeed, NCCL and config hash as the first node."""
    differ = [f"{key} {mine.get(key)} here but {first.get(key)} on {first_host}"
              for key in sorted(set(mine) | set(first)) if mine.get(key) != first.get(key)]
    if differ:
        return Check("software", FAIL, f"{'; '.join(differ)}; run every node from one environment and one job dir.",
                     {"versions": mine})
    shown = ", ".join(f"{k} {v}" for k, v in mine.items() if v and k != "config_hash")
    return Check("software", OK, shown, {"versions": mine})


def clock(offset_s: float, first_host: str) -> Check:
    """This node's clock against the first node's (NTP-style: half the round trip taken off)."""
    data = {"offset_s": offset_s}
    if abs(offset_s) > CLOCK_SKEW_WARN_S:
        return Check("clock", WARN, f"this clock is {offset_s:+.1f} s off {first_host}'s; enable NTP/chrony, or "
                                    f"timeouts and logs will not line up.", data)
    return Check("clock", OK, f"{offset_s * 1000:+.0f} ms from {first_host}", data)


def allreduce(result: dict, node: int, hosts: list[str]) -> Check:
    """The all-nodes all-reduce, or which pair failed when it did not (rank = node index)."""
    if result.get("ok"):
        return Check("allreduce", OK, f"gloo all-reduce over {len(hosts)} node(s) in {result['seconds']:.1f} s",
                     result)
    absent = [hosts[j] for j in result.get("absent_peers", [])]
    if absent:
        return Check("allreduce", FAIL, f"{', '.join(absent)} did not reach the all-reduce ({result.get('error')}); "
                                        f"its own line says what held it, or it stopped: check or leave out that "
                                        f"node.", result)
    failed = [hosts[j] for j in result.get("failed_peers", [])]
    if node == 0 and result.get("self_failed"):
        return Check("allreduce", FAIL, f"the all-reduce could not start on this first node ({result.get('error')}); "
                                        f"free the rendezvous port or check this node's network.", result)
    if result.get("self_failed"):
        return Check("allreduce", FAIL, f"this node ({hosts[node]}) fails the all-reduce with {hosts[0]} "
                                        f"({result.get('error')}); check its network (interfaces) and firewall.",
                     result)
    if failed:
        return Check("allreduce", FAIL, f"the all-reduce fails with {', '.join(failed)} (pairwise from "
                                        f"{hosts[0]}); check that node's network, or leave it out of the job.",
                     result)
    works = "every pair with it" if node == 0 else f"this node's pair with {hosts[0]}"
    return Check("allreduce", FAIL, f"the all-reduce over all nodes failed ({result.get('error')}) though {works} "
                                    f"works; the failing node's own line names it, else rerun.", result)


def gpus(found: list[GpuHealth] | None, *, device: str, gpus_per_node: int, gpu_mem_bytes: int) -> Check:
    """Count and memory as the plan expects; no uncorrected ECC, pending retirement, failed remap, foreign process."""
    if found is None or not found:
        if device == "cuda":
            return Check("gpus", FAIL, f"no GPU visible here (NVML finds none) but the plan needs {gpus_per_node}; "
                                       f"check the partition, --gpus-per-node and the driver.")
        return Check("gpus", SKIP, "no GPU (CPU plan)")
    data = {"gpus": [g.to_dict() for g in found]}
    problems = []
    if device == "cuda" and len(found) < gpus_per_node:
        problems.append(f"{len(found)} GPU(s) but the plan needs {gpus_per_node}")
    for g in found:
        if gpu_mem_bytes and g.memory_total < gpu_mem_bytes * GPU_MEMORY_TOLERANCE:
            problems.append(f"GPU {g.index} has {format_bytes(g.memory_total)}, the plan assumed {format_bytes(gpu_mem_bytes)}")
        if g.ecc_uncorrected:
            problems.append(f"GPU {g.index} has {g.ecc_uncorrected} uncorrected ECC error(s)")
        if g.retired_pages_pending:
            problems.append(f"GPU {g.index} has retired pages pending (needs a reset)")
        if g.remapped_rows_failed:
            problems.append(f"GPU {g.index} failed a row remap")
        if g.remapped_rows_pending:
            problems.append(f"GPU {g.index} has row remaps pending (needs a reset)")
        if g.other_processes:
            problems.append(f"GPU {g.index} is used by pid(s) {', '.join(map(str, g.other_processes))}")
    if problems:
        return Check("gpus", FAIL, f"{'; '.join(problems)}; drain this node (report it to the admins) and resubmit "
                                   f"without it.", data)
    return Check("gpus", OK, f"{len(found)} x {found[0].name or 'GPU'} {format_bytes(found[0].memory_total)}, healthy", data)


def environment(recorded: dict | None, mine: dict) -> Check:
    """This node's python, torch, torch's CUDA and packages against those `llaunch submit` recorded with the job's
    frozen code (cluster.snapshot). A WARN, never a FAIL: the code is frozen but an environment cannot be (a venv
    is not copied), and a site's update may well run the frozen code as before; refusing would end a requeued job
    that a resubmission would only put back into the same environment. The warning in the node's log and report
    is what ties a changed loss to its cause."""
    if recorded is None:
        return Check("environment", SKIP, "no environment recorded at submit (not a submitted job)")
    if recorded.get("container"):
        return Check("environment", SKIP, f"the job runs in the image {recorded['container']}: its packages are the "
                                          f"image's")
    differ = [f"{key} {mine.get(key)} here, {recorded.get(key)} at submit" for key in ("python", "torch", "cuda")
              if mine.get(key) != recorded.get(key)]
    theirs, ours = recorded.get("packages", {}), mine.get("packages", {})
    changed = sorted(name for name in set(theirs) | set(ours) if theirs.get(name) != ours.get(name) and name != "torch")
    if changed:
        shown = ", ".join(f"{name} {ours.get(name)} (was {theirs.get(name)})" for name in changed[:3])
        differ.append(f"{len(changed)} package(s) differ: {shown}{', ...' if len(changed) > 3 else ''}")
    data = {"differ": differ}
    if differ:
        return Check("environment", WARN, f"{'; '.join(differ)}; the job's code is frozen but not its environment: "
                                          f"resubmit from this one, or restore the one recorded.", data)
    return Check("environment", OK, f"python {mine.get('python')}, torch {mine.get('torch')} and "
                                    f"{len(ours)} packages as at submit", data)
