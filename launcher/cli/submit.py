"""`llaunch submit CONFIG --nodes K`: plan for the cluster's nodes, write plan.yaml, sbatch through submitit.

Defaults come from a cluster profile (`--cluster NAME`, cluster/profiles/NAME.yaml); every flag overrides
its field. The job requeues itself after a preemption or time-limit signal and resumes from its newest
checkpoint; `llaunch status`, `logs` and `cancel` find it again by its id.
"""

from __future__ import annotations

import argparse

from launcher.knobs import SUBMIT, add_knob_flags


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("submit", help="submit a training job to SLURM (multi-node torchrun, auto-requeue)")
    p.add_argument("config", help="train config YAML (see examples/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override config values, e.g. training.learning_rate=1e-4")
    p.add_argument("--cluster", default="local", help="cluster profile: a name under cluster/profiles or a YAML path (default: local)")
    p.add_argument("--min-nodes", type=int, help="the fewest nodes the job may run (and continue) on, with the same "
                                                 "global batch (default: all of --nodes)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--time", help="time limit, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--constraint", help="node features, e.g. h100")
    p.add_argument("--max-requeues", type=int, help="how many preemptions/time limits the job survives")
    p.add_argument("--output-dir", help="where plan, checkpoints, metrics and logs go (default: the config's output_dir)")
    p.add_argument("--wait", action="store_true", help="block until the job ends; exit 0 only if it completed")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and each node's torchrun command; submit nothing")
    add_knob_flags(p, SUBMIT)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cluster.executor import check_partition, slurm_reachable
    from cluster.local import slurm_env
    from cluster.profile import load_profile
    from cluster.submission import job_name
    from launcher.jobdir.prepare import prepare_job
    from launcher.knobs import cli_knobs, config_overrides
    from launcher.train.faults import faults_from_env

    faults_from_env()  # a bad LLAUNCH_FAULT is refused here, not by every rank of the job
    knobs = cli_knobs(args)  # the nodes and GPUs per node describe the profile's nodes; 0 GPUs: CPU nodes
    profile = load_profile(args.cluster).replace(
        nodes=knobs.pop("nodes", None), min_nodes=args.min_nodes, gpus_per_node=knobs.pop("gpus_per_node", None),
        partition=args.partition, account=args.account,
        qos=args.qos, time=args.time, constraint=args.constraint, max_requeues=args.max_requeues,
    )
    env = slurm_env(profile.local)
    if not args.dry_run:
        slurm_reachable(env)  # before anything is written
        check_partition(profile, env)
    knobs.update(nodes=profile.nodes, gpus_per_node=profile.gpus_per_node or None)
    flags = config_overrides(args, without=("gpus_per_node",))  # the profile's nodes', not parallel.nproc_per_node
    job = prepare_job(args.config, args.overrides, flags=flags, knobs=knobs, output_dir=args.output_dir,
                      hardware=profile.hardware(), write=False)
    profile = _supervision(job.config.supervision, profile, env)
    for nodes in range(profile.min_nodes or profile.nodes, profile.nodes):
        job.plan.on_nodes(nodes)  # each allocation --min-nodes allows must split the global batch
    name = job_name(f"llaunch-{Path(args.config).stem}")
    if args.dry_run:  # writes nothing: the job dir may belong to a running job that rereads it on requeue
        _print_dry_run(job, profile, name, env)
        return 0
    record = _submit(job, profile, name, env)
    return _wait(record) if args.wait else 0


def _supervision(supervision, profile, env: dict[str, str]):
    """Fold the profile's supervision settings under the config's (the job dir's config.yaml then holds what the
    nodes use) and check LLAUNCH_WATCHDOG over them here, not on the nodes; returns the profile with the job's
    collective timeout (the variable's, the config's or the profile's)."""
    import dataclasses
    import math

    from launcher.env import dist_timeout_s
    from launcher.runtime.watchdog_config import WatchdogConfig

    supervision.watchdog = {**profile.watchdog, **supervision.watchdog}
    WatchdogConfig.resolve(env, supervision.watchdog)
    timeout = dist_timeout_s(env, supervision.dist_timeout_s, profile.dist_timeout_s)
    return dataclasses.replace(profile, dist_timeout_s=math.ceil(timeout))


def _print_dry_run(job, profile, name: str, env: dict[str, str]) -> None:
    """The sbatch script (with the hosts the node ledger keeps out), each node's command and the plan, as
    `submit` would write and run them."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from cluster.exclusion import exclusion_sentence, quarantined_nodes
    from cluster.submission import node_command, render_node_command, render_sbatch, step_python, training_parameters
    from launcher.jobdir.layout import JobDir

    job_dir = Path(job.output_dir).resolve()
    container = _container(job, profile, env)
    parameters = training_parameters(profile, name, JobDir(job_dir).slurm, sys.executable, container)
    try:  # sinfo says which quarantined hosts the partition can spare; without SLURM there is nothing to keep out
        exclude = quarantined_nodes(profile, env) if shutil.which("sinfo") else []
    except (OSError, subprocess.SubprocessError):
        exclude = []
    if exclude:
        parameters["exclude"] = ",".join(exclude)
        print(f"# {exclusion_sentence(profile, exclude)}")
    print(f"# sbatch script for {profile.nodes} node(s) (cluster profile {profile.name}):")
    print(render_sbatch(parameters, JobDir(job_dir).slurm, step_python(container, sys.executable)))
    wrap = container.wrap(profile.gpus_per_node > 0) if container else []
    argv, extra_env = node_command(job.plan, job_dir, rdzv_host="FIRST_NODE", rdzv_port="RDZV_PORT",
                                   job_id="JOB_ID", max_restarts=profile.max_restarts,
                                   dist_timeout_s=profile.dist_timeout_s, cpus_per_node=profile.cpus_per_task,
                                   python=container.container.python if container else sys.executable, wrap=wrap)
    print("# each node's task runs (FIRST_NODE = first of `scontrol show hostnames \"$SLURM_JOB_NODELIST\"`,")
    print("# RDZV_PORT = 20000 + JOB_ID % 10000):")
    print(render_node_command(argv, extra_env))
    print(f"# the plan ({JobDir(job_dir).plan} when submitted):")
    print(job.plan.to_yaml().rstrip())
    print("# nothing written, nothing submitted (--dry-run).")


def _container(job, profile, env: dict[str, str]):
    """The profile's container for this job, with the job dir and token cache it mounts; None without one."""
    from pathlib import Path

    from cluster.submission import ContainerJob
    from launcher.env import cache_root

    if profile.container is None:
        return None
    cache = cache_root(job.config.data.cache_dir, env).resolve()
    return ContainerJob(profile.container, str(Path(job.output_dir).resolve()), str(cache))


def _submit(job, profile, name: str, env: dict[str, str]):
    """Write the job dir and sbatch it, unless a job that has not ended owns that dir; the record lets
    `status`, `logs` and `cancel` find the job by its id."""
    from pathlib import Path

    from cluster.executor import submit
    from cluster.jobs import JobRecord, active_job_in
    from launcher.env import SLURM_CONF
    from launcher.errors import LaunchError
    from launcher.jobdir.layout import JobDir
    from launcher.jobdir.prepare import write_job

    job_dir = Path(job.output_dir).resolve()
    active = active_job_in(JobDir(job_dir).slurm, env)
    if active:
        raise LaunchError(f"{job_dir} belongs to job {active[0]}, which is {active[1].state.lower()}; wait for it "
                          f"to end, `llaunch cancel {active[0]}`, or choose another --output-dir.")
    write_job(job)
    submitted = submit(job_dir, profile, name, env, _container(job, profile, env))
    record = JobRecord(job_id=str(submitted.job_id), name=name, output_dir=str(job_dir),
                       log_folder=str(JobDir(job_dir).slurm), nodes=profile.nodes, cluster=profile.name,
                       slurm_conf=SLURM_CONF.get(env))
    record.save()
    plan = job.plan
    print(f"submitted job {record.job_id} ({name}): {plan.nodes} node(s) x {plan.gpus_per_node} "
          f"{'GPU' if plan.device == 'cuda' else 'process'}(es), {plan.strategy}, "
          f"requeues up to {profile.max_requeues} time(s)")
    print(f"  plan:   {JobDir(job_dir).plan}")
    print(f"  logs:   {record.log_paths(0)[0]}  (all nodes: {record.log_folder})")
    print(f"  follow: llaunch status {record.job_id}   llaunch logs {record.job_id} -f   llaunch cancel {record.job_id}")
    return record


def _wait(record) -> int:
    """`--wait`: block until the job ends, print its status; 0 only if it completed."""
    from cluster.jobs import wait_for_end
    from launcher.cli.status import describe

    try:
        state = wait_for_end(record.job_id, record.env())
    except KeyboardInterrupt:
        print(f"\nstopped waiting; job {record.job_id} keeps running (`llaunch status {record.job_id}`, "
              f"`llaunch cancel {record.job_id}`).", flush=True)
        return 130
    print("\n".join(describe(record.job_id)))
    return 0 if state.state == "COMPLETED" else 1
