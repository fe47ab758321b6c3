"""Which hosts a job keeps out: at submission, the hosts the cluster profile's node ledger quarantines (as many
as the partition can spare); after a hang or a node failure, the culprit's host added to the requeued job's
ExcNodeList (when the job can still get its --min-nodes without it).
"""

from __future__ import annotations

import os
import subprocess

from cluster.jobs import parse_scontrol_job
from launcher.observe.node_ledger import NodeLedger, QuarantinePolicy, exclude_for_next_submission
from cluster.profile import ClusterProfile


def node_hostnames(nodelist: str) -> list[str]:
    """Expand a compressed SLURM node list (n[1-3,7], gpu-a[01-02]) the way SLURM itself does."""
    result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    if result.returncode != 0 or not result.stdout.strip():
        raise RuntimeError(f"scontrol show hostnames {nodelist!r} failed: {result.stderr.strip()}")
    return result.stdout.split()


def node_can_be_spared(host: str, job_id: str, min_nodes: int) -> bool:
    """Whether the job can run without `host`: the partition's other nodes, less those the job already
    excludes, still number at least `min_nodes` (else the requeued job would wait forever)."""
    partition = os.environ.get("SLURM_JOB_PARTITION")
    argv = ["sinfo", "--noheader", "--Node", "--format=%N"] + (["--partition", partition] if partition else [])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    nodes = set(result.stdout.split()) if result.returncode == 0 else set()
    return len(nodes - {host} - set(excluded_nodes(job_id))) >= min_nodes


def excluded_nodes(job_id: str) -> list[str]:
    """The job's ExcNodeList, expanded."""
    result = subprocess.run(["scontrol", "--oneliner", "show", "job", str(job_id)], capture_output=True, text=True,
                            timeout=30)
    listed = parse_scontrol_job(result.stdout).get("ExcNodeList", "(null)") if result.returncode == 0 else "(null)"
    return node_hostnames(listed) if listed not in ("", "(null)") else []


def exclude_from_requeued_job(job_id: str, hosts: list[str]) -> None:
    """Add `hosts` to the ExcNodeList of the job just requeued. SLURM 22.05 refuses that update on a running
    job ("no longer pending execution") but takes it once `scontrol requeue` has made the job pending again,
    while its nodes still clean up (COMPLETING) and this task, which ignores SIGTERM by then, still runs."""
    listed = ",".join(sorted({*excluded_nodes(job_id), *hosts}))
    result = subprocess.run(["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={listed}"], capture_output=True,
                            text=True, timeout=30)
    if result.returncode == 0:
        print(f"[llaunch] the requeued job excludes {listed}", flush=True)
    else:
        print(f"[llaunch] warning: could not exclude {listed} from the requeued job: {result.stderr.strip()}",
              flush=True)


def quarantined_nodes(profile: ClusterProfile, env: dict[str, str]) -> list[str]:
    """The hosts the profile's node ledger keeps out of the next job, never more than the partition can spare
    (launcher.observe.node_ledger); [] when sinfo cannot list the partition's nodes."""
    events = NodeLedger.for_profile(profile.name).events()
    if not events:
        return []
    argv = ["sinfo", "--noheader", "--Node", "--format=%N"] + (["--partition", profile.partition] if profile.partition else [])
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    nodes = sorted(set(result.stdout.split())) if result.returncode == 0 else []
    return exclude_for_next_submission(events, QuarantinePolicy(), nodes, profile.min_nodes or profile.nodes)


def exclusion_sentence(profile: ClusterProfile, exclude: list[str]) -> str:
    return f"keeping {', '.join(exclude)} out of this job (node ledger {NodeLedger.for_profile(profile.name).path})"
