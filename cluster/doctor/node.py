"""Every check on one node: measure, exchange facts with the other nodes, judge, write DIR/doctor/node-N.json.

The nodes run this at the same time (one SLURM task each, or one process for this machine alone). The first
node writes a nonce into the job dir and serves it with its versions and clock; every node fetches the
first node's facts (rendezvous reachable, storage, software, clock) and every peer's interfaces, then all
join one gloo all-reduce on the rendezvous port. A node's verdict is about itself, so each line names it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from cluster import snapshot
from cluster.doctor import checks, exchange, probes
from cluster.doctor.checks import FAIL, Check
from cluster.doctor.faults import Faults
from launcher.env import DOCTOR_FAULT
from launcher.files import write_text_atomic
from launcher.jobdir.layout import JobDir
from launcher.planning.plan import Plan

NONCE_FILE = ".llaunch-doctor-nonce"
FETCH_TIMEOUT_S = 15.0  # the other nodes' tasks start within seconds of each other
ARRIVAL_TIMEOUT_S = 30.0  # nodes reach the all-reduce as far apart as their checks' durations (writes, pip)
ALLREDUCE_TIMEOUT_S = 8.0  # the collective alone, once every node has arrived
# a store client can hang past its timeout; torch imports in ~5 s
ALLREDUCE_LIMIT_S = ARRIVAL_TIMEOUT_S + 2 * ALLREDUCE_TIMEOUT_S + 15
FILES_PER_RANK = 4  # a rank's shards and state files per checkpoint
FILES_PER_CHECKPOINT = 16  # manifest, plan, config, tokenizer, model config


@dataclass
class NodeContext:
    """Where this node stands in the job: its index, every node's name and NodeAddr, the rendezvous port."""

    job_dir: Path
    node: int
    hosts: list[str]
    addresses: list[str]
    rdzv_port: int
    job_id: str = "local"
    attempt: str = ""  # the job's incarnation the checks run for (cluster.job_events.attempt_id)
    plan: Plan | None = None
    keep_checkpoints: int = 1
    trainable_params: int = 0

    @property
    def first(self) -> bool:
        return self.node == 0

    @property
    def host(self) -> str:
        return self.hosts[self.node]


@dataclass
class NodeReport:
    node: int
    host: str
    job_id: str
    checks: list[Check] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # what the job's environment gets (interfaces)
    peers_failed: int = 0  # other nodes that failed a check (from the all-reduce): then no node starts torchrun
    attempt: str = ""  # NodeContext.attempt: the first node tells this attempt's reports from an earlier one's

    @property
    def failed(self) -> Check | None:
        return next((c for c in self.checks if c.status == FAIL), None)

    @property
    def stops_torchrun(self) -> bool:
        """Whether this node or another failed a check: then no node starts torchrun."""
        return self.failed is not None or self.peers_failed > 0

    @property
    def host_fault(self) -> Check | None:
        """The first failed check that blames this host itself (checks.HOST_CHECKS), for the node ledger."""
        return next((c for c in self.checks if c.status == FAIL and c.name in checks.HOST_CHECKS), None)

    def lines(self) -> list[str]:
        return [f"{self.host:<10} {c.name:<11} {c.status:<4}  {c.sentence}" for c in self.checks]

    def to_dict(self) -> dict:
        return {"node": self.node, "host": self.host, "job_id": self.job_id, "attempt": self.attempt, "env": self.env,
                "peers_failed": self.peers_failed, "checks": [c.to_dict() for c in self.checks]}

    @classmethod
    def from_dict(cls, data: dict) -> "NodeReport":
        known = {f.name for f in fields(Check)}
        return cls(node=data["node"], host=data["host"], job_id=data["job_id"], env=data.get("env", {}),
                   peers_failed=data.get("peers_failed", 0), attempt=data.get("attempt", ""),
                   checks=[Check(**{k: v for k, v in c.items() if k in known}) for c in data["checks"]])

    @classmethod
    def read(cls, job_dir: Path, node: int) -> "NodeReport | None":
        """Node `node`'s newest report in the job dir; None when there is none yet or it cannot be read."""
        try:
            return cls.from_dict(json.loads(results_path(job_dir, node).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def failure_sentence(self) -> str:
        check = self.failed
        return f"doctor: {check.name} failed on {self.host}: {check.sentence}" if check else ""


def results_path(job_dir: Path, node: int) -> Path:
    return JobDir(job_dir).doctor / f"node-{node}.json"


def run_node(ctx: NodeContext, env: dict[str, str] | None = None) -> NodeReport:
    """All checks on this node; writes its JSON into the job dir and returns the report."""
    env = dict(os.environ if env is None else env)
    faults = Faults.from_env(env)
    report = NodeReport(ctx.node, ctx.host, ctx.job_id, attempt=ctx.attempt)
    peers = [j for j in range(len(ctx.hosts)) if j != ctx.node]
    facts = _own_facts(ctx, faults)
    with contextlib.ExitStack() as stack:
        storage_dir = _storage_dir(ctx, faults, stack)
        if ctx.first and faults.occupy_port:
            stack.enter_context(_listening(ctx.rdzv_port))
        port_busy = probes.port_busy(ctx.rdzv_port) if ctx.first else None
        if ctx.first:
            facts["nonce"] = _write_nonce(storage_dir, stack)
        port = exchange.doctor_port(ctx.rdzv_port, ctx.node)
        try:
            server = exchange.FactsServer(facts, port)
        except OSError as err:  # the other nodes then name this one (no answer, not in the all-reduce)
            report.checks.append(Check("rendezvous", FAIL, f"the doctor's own port {port} is taken on this node "
                                                           f"({err.strerror}); resubmit (ports follow the job id)."))
            return _saved(ctx, report)
        stack.callback(server.close)
        rendezvous, *with_the_first = _against_the_first_node(ctx, facts, storage_dir, port_busy)
        interface_check, report.env = checks.interfaces(_reach(ctx, peers, sorted(facts["interfaces"])), env)
        report.checks += [rendezvous, interface_check, *with_the_first]
        report.checks.append(_space(ctx, storage_dir, faults))
        report.checks.append(_gpus(ctx, faults))
        report.checks.append(checks.environment(snapshot.recorded_environment(ctx.job_dir), snapshot.environment()))
        time.sleep(faults.late_on(ctx.node, ctx.host))
        result = _allreduce(ctx, {**env, **report.env}, failed=report.failed is not None)
        report.peers_failed = max(0, result.get("nodes_failed", 0) - (report.failed is not None))
        report.checks.append(checks.allreduce(result, ctx.node, ctx.hosts))
        server.wait_asked(set(peers), FETCH_TIMEOUT_S)
    return _saved(ctx, report)


def _own_facts(ctx: NodeContext, faults: Faults) -> dict:
    """What this node tells the others: versions (and config hash), interfaces, its NodeAddr."""
    mine = {**probes.versions(), "config_hash": probes.config_hash(JobDir(ctx.job_dir))}
    mine.update(faults.version_on(ctx.node, ctx.host))
    loopback = all(probes.is_loopback(a) for a in ctx.addresses)
    return {"node": ctx.node, "host": ctx.host, "versions": mine, "interfaces": probes.interfaces(loopback),
            "node_addr": ctx.addresses[ctx.node]}


def _against_the_first_node(ctx: NodeContext, facts: dict, storage_dir: Path, port_busy) -> list[Check]:
    """Rendezvous, storage, software and clock, from the first node's facts (asked over TCP, which also
    measures the clock offset); all FAIL when it does not answer."""
    address = ctx.addresses[0]
    try:
        first, offset = exchange.fetch(address, exchange.doctor_port(ctx.rdzv_port, 0), ctx.node, FETCH_TIMEOUT_S)
        reach_error = None
    except OSError as err:
        first, offset, reach_error = None, None, str(err)
    found = [checks.rendezvous(
        address, ctx.rdzv_port, resolves=probes.resolves(address), reach_error=reach_error, port_busy=port_busy,
        first_node_addr=first["node_addr"] if first else address, first_host=ctx.hosts[0])]
    if first is None:
        return found + [Check(name, FAIL, f"not checked: the first node ({ctx.hosts[0]}) did not answer.")
                        for name in ("storage", "software", "clock")]
    return found + [
        checks.storage(str(storage_dir), first=ctx.first, first_host=ctx.hosts[0],
                       seen=ctx.first or _nonce_seen(storage_dir, first.get("nonce"))),
        checks.software(facts["versions"], first["versions"], ctx.hosts[0]),
        checks.clock(offset, ctx.hosts[0]),
    ]


def _saved(ctx: NodeContext, report: NodeReport) -> NodeReport:
    write_text_atomic(results_path(ctx.job_dir, ctx.node), json.dumps(report.to_dict(), indent=2))
    return report


@contextlib.contextmanager
def _listening(port: int):
    """The occupied-port fault: a real listener on the port for as long as the checks run."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is no listener
        sock.bind(("", port))
        sock.listen(1)
        yield


def _storage_dir(ctx: NodeContext, faults: Faults, stack: contextlib.ExitStack) -> Path:
    """The job dir, or under the local-storage fault a directory only this node has (removed at the end)."""
    if not faults.local_storage:
        return Path(ctx.job_dir)
    local = Path(tempfile.gettempdir()) / f"llaunch-doctor-{ctx.job_id}-node-{ctx.node}"
    stack.callback(shutil.rmtree, local, ignore_errors=True)
    return local


def _write_nonce(storage_dir: Path, stack: contextlib.ExitStack) -> str:
    nonce = secrets.token_hex(16)
    path = storage_dir / NONCE_FILE
    write_text_atomic(path, nonce)
    stack.callback(path.unlink, missing_ok=True)  # at the end: each peer reads it before it joins the all-reduce
    return nonce


def _nonce_seen(storage_dir: Path, nonce: str | None, timeout_s: float = 5.0) -> bool:
    """Whether the first node's nonce is in storage_dir here (a few seconds for NFS attribute caches)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError):
            if nonce and (storage_dir / NONCE_FILE).read_text() == nonce:
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def _reach(ctx: NodeContext, peers: list[int], own: list[str]) -> dict[str, list[str]]:
    """For each interface name the peers serve on, the peers not reached at it (or lacking it); this node's
    own names when no peer answered at all."""
    served = {}
    for peer in peers:
        try:
            facts, _ = exchange.fetch(ctx.addresses[peer], exchange.doctor_port(ctx.rdzv_port, peer), ctx.node,
                                      FETCH_TIMEOUT_S)
            served[peer] = facts["interfaces"]
        except OSError:
            served[peer] = {}
    names = sorted({name for ifaces in served.values() for name in ifaces}) or own
    return {name: [ctx.hosts[p] for p in peers if name not in served[p] or not exchange.reaches(
        served[p][name], exchange.doctor_port(ctx.rdzv_port, p))] for name in names}


def _space(ctx: NodeContext, storage_dir: Path, faults: Faults) -> Check:
    from launcher.planning.memory_sizes import checkpoint_bytes

    need, why = 0, "no plan given"
    files = FILES_PER_CHECKPOINT
    if ctx.plan is not None:
        plan = ctx.plan
        one = checkpoint_bytes(plan.params, ctx.trainable_params or plan.params, plan)
        export = checkpoint_bytes(plan.params, 0, plan)
        need = ctx.keep_checkpoints * one + export
        why = f"{ctx.keep_checkpoints} checkpoint(s) of {checks.format_bytes(one)} + export {checks.format_bytes(export)}"
        files = (ctx.keep_checkpoints + 1) * (plan.world_size * FILES_PER_RANK + FILES_PER_CHECKPOINT)
    if faults.min_free_bytes > need:
        need, why = faults.min_free_bytes, f"{faults.min_free_bytes} B from {DOCTOR_FAULT.name}MIN_FREE_BYTES"
    free, inodes = probes.free_space(storage_dir)
    try:
        bandwidth = probes.write_bandwidth(probes.nearest_existing(storage_dir))
    except OSError:
        bandwidth = None
    return checks.space(str(storage_dir), free_bytes=free, free_inodes=inodes, need_bytes=need, need_inodes=files,
                        why=why, bandwidth=bandwidth)


def _allreduce(ctx: NodeContext, env: dict[str, str], failed: bool) -> dict:
    argv = [sys.executable, "-m", "cluster.doctor.allreduce", ctx.addresses[0], str(ctx.rdzv_port), str(ctx.node),
            str(len(ctx.hosts)), str(ARRIVAL_TIMEOUT_S), str(ALLREDUCE_TIMEOUT_S), str(int(failed))]
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=ALLREDUCE_LIMIT_S)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"no result in {ALLREDUCE_LIMIT_S:.0f} s", "self_failed": True}
    with contextlib.suppress(IndexError, ValueError):
        return json.loads(done.stdout.strip().splitlines()[-1])
    last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return {"ok": False, "error": f"the all-reduce process ended without a result: {last[:200]}", "self_failed": True}


def _gpus(ctx: NodeContext, faults: Faults) -> Check:
    plan = ctx.plan
    if faults.nvml is not None:
        found = [probes.GpuHealth.from_dict({"index": i, "memory_total": plan.gpu_mem_bytes if plan else 0, **g})
                 for i, g in enumerate(faults.nvml)]
    else:
        found = probes.nvml_gpus()
    return checks.gpus(found, device=plan.device if plan else "cpu", gpus_per_node=plan.gpus_per_node if plan else 0,
                       gpu_mem_bytes=plan.gpu_mem_bytes if plan else 0)


def job_facts(config, plan: Plan) -> tuple[int, int]:
    """(checkpoints kept at once, trainable parameters) for the space check, from the job's config and plan."""
    training = config.training
    if training.save_strategy == "no":
        keep = 0
    elif training.save_total_limit:
        keep = training.save_total_limit
    elif training.max_steps > 0 and training.save_strategy == "steps" and training.save_steps > 0:
        keep = max(1, training.max_steps // training.save_steps)  # every save the run makes is kept
    else:
        keep = 1
    trainable = plan.params
    if plan.trains_adapters:
        from launcher.planning.models import load_model_spec

        trainable = load_model_spec(plan.model, config.model.overrides).lora_params(plan.lora_r, plan.lora_targets)
    return keep, trainable


def preflight(job_dir: Path, hosts: list[str], addresses: list[str], node: int, job_id: str,
              rdzv_port: int, attempt: str) -> NodeReport:
    """The checks a submitted job's node task runs before `attempt`'s torchrun, on the job dir's plan and config."""
    from launcher.config import TrainConfig

    plan = Plan.load(JobDir(job_dir).plan)
    keep, trainable = job_facts(TrainConfig.load(JobDir(job_dir).config), plan)
    report = run_node(NodeContext(Path(job_dir), node, hosts, addresses, rdzv_port, job_id=str(job_id), attempt=attempt,
                                  plan=plan, keep_checkpoints=keep, trainable_params=trainable))
    print("\n".join(f"[llaunch] doctor {line}" for line in report.lines()), flush=True)
    return report
