"""What `llaunch submit` and `llaunch doctor --nodes` ask of the SLURM cluster before they write anything: that
its commands and controller answer, and that the partition can ever run the request (SLURM would keep a job
it cannot run pending forever)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from cluster.jobs import parse_scontrol_job
from cluster.profile import ClusterProfile, time_to_minutes
from launcher.env import SLURM_CONF
from launcher.errors import LaunchError


def slurm_reachable(env: dict[str, str]) -> None:
    """Raise the one-sentence error `llaunch submit` prints when there is no SLURM to submit to."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        raise LaunchError("SLURM is not installed here (no sbatch); submit from a login node or run `llaunch cluster up`.")
    conf = SLURM_CONF.get(env)
    if conf and not Path(conf).is_file():  # scontrol would retry for a minute before saying so
        raise LaunchError(f"{SLURM_CONF.name} points at {conf}, which does not exist; run `llaunch cluster up` "
                          f"or export the path of your cluster's slurm.conf.")
    try:
        ping = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        ping = None
    if ping is None or ping.returncode != 0 or "UP" not in ping.stdout:
        raise LaunchError(
            "SLURM is not reachable (slurmctld does not answer); start the local cluster with `llaunch cluster up` "
            f"or point {SLURM_CONF.name} at your cluster's slurm.conf."
        )


def check_partition(profile: ClusterProfile, env: dict[str, str]) -> None:
    """Refuse a request the partition can never run (SLURM would keep it pending forever): more nodes
    than it has or allows, or a time limit above its MaxTime."""
    argv = ["scontrol", "--oneliner", "show", "partition"] + ([profile.partition] if profile.partition else [])
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    partitions = [parse_scontrol_job(line) for line in result.stdout.splitlines() if line.strip()]
    if profile.partition is None:
        partitions = [p for p in partitions if p.get("Default") == "YES"]
    if result.returncode != 0 or not partitions:
        where = f"partition {profile.partition!r} does not exist" if profile.partition else "there is no default partition"
        raise LaunchError(f"{where} on this cluster; pick one that `sinfo` lists with --partition.")
    part = partitions[0]
    name = part.get("PartitionName", profile.partition)
    limits = [int(part[key]) for key in ("TotalNodes", "MaxNodes") if part.get(key, "").isdigit()]
    if limits and profile.allocation_nodes > min(limits):
        asked, fix = (f"--nodes {profile.nodes} and --spare-nodes {profile.spare_nodes}", "fewer in all") \
            if profile.spare_nodes else (f"--nodes {profile.nodes}", f"--nodes {min(limits)}")
        raise LaunchError(f"{asked} is more than partition {name} can give one job ({min(limits)}); use {fix} or "
                          f"another --partition.")
    max_time = part.get("MaxTime", "UNLIMITED")
    if max_time not in ("UNLIMITED", "INFINITE") and profile.time_minutes > time_to_minutes(max_time):
        raise LaunchError(f"--time {profile.time} is longer than partition {name} allows ({max_time}); "
                          f"give a shorter --time or another --partition.")
