"""`llaunch submit CONFIG --nodes K`: plan for the cluster's nodes, write plan.yaml, sbatch through submitit.

Defaults come from a cluster profile (`--cluster NAME`, cluster/profiles/NAME.yaml); every flag overrides
its field. The job requeues itself after a preemption or time-limit signal and resumes from its newest
checkpoint; `llaunch status`, `logs` and `cancel` find it again by its id. With `--sweep` the command plans
one job per element of the grid (launcher.sweep) and submits them as one SLURM job array (cluster.sweep).
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
    p.add_argument("--code", metavar="DIR", help="the code the job imports, frozen into the job dir (default: the git "
                                                 "repository of the config; llaunch's own source always is)")
    p.add_argument("--allow-dirty", action="store_true", help="freeze the code with its uncommitted changes (their "
                                                              "diff is kept in the job dir) instead of refusing")
    p.add_argument("--notify", metavar="CMD", help="a shell command run on each change of the job's state, which "
                                                   "finds the job's id, state, step, loss and dir in its environment "
                                                   "(default: the profile's notify)")
    p.add_argument("--sweep", action="append", metavar="section.key=V1,V2,...",
                   help="one job per value (a grid over every --sweep), each planned and in its own directory under "
                        "--output-dir, submitted as one SLURM job array; `llaunch status` of its id shows them all")
    p.add_argument("--max-parallel", type=int, metavar="N", help="with --sweep: at most N elements run at once")
    add_knob_flags(p, SUBMIT)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cluster.slurm_checks import check_partition, slurm_reachable
    from cluster.local import slurm_env
    from cluster.profile import load_profile
    from cluster.snapshot import FrozenCode, user_code
    from cluster.submission import job_name
    from launcher.env import PYTHONPATH
    from launcher.jobdir.prepare import prepare_job
    from launcher.knobs import cli_knobs, config_overrides
    from launcher.train.faults import faults_from_env

    faults_from_env()  # a bad LLAUNCH_FAULT is refused here, not by every rank of the job
    knobs = cli_knobs(args)  # the nodes and GPUs per node describe the profile's nodes; 0 GPUs: CPU nodes
    profile = load_profile(args.cluster).replace(
        nodes=knobs.pop("nodes", None), min_nodes=args.min_nodes, gpus_per_node=knobs.pop("gpus_per_node", None),
        partition=args.partition, account=args.account,
        qos=args.qos, time=args.time, constraint=args.constraint, max_requeues=args.max_requeues, notify=args.notify,
        spare_nodes=args.spare_nodes, max_restarts=args.max_restarts,
    )
    env = slurm_env(profile.local)
    if not args.dry_run:
        slurm_reachable(env)  # before anything is written
        check_partition(profile, env)
    user = user_code(args.config, args.code, args.allow_dirty)  # before tokenizing: a dirty tree is refused at once
    knobs.update(nodes=profile.nodes, gpus_per_node=profile.gpus_per_node or None)
    flags = config_overrides(args, without=("gpus_per_node",))  # the profile's nodes', not parallel.nproc_per_node
    name = job_name(f"llaunch-{Path(args.config).stem}")
    if args.sweep or args.max_parallel is not None:
        return _run_sweep(args, knobs, flags, profile, env, name, user)
    job = prepare_job(args.config, args.overrides, flags=flags, knobs=knobs, output_dir=args.output_dir,
                      hardware=profile.hardware(), write=False)
    profile = job_profile(job, profile, env)
    frozen = FrozenCode(Path(job.output_dir).resolve(), user, PYTHONPATH.get(env))
    if args.dry_run:  # writes nothing: the job dir may belong to a running job that rereads it on requeue
        _print_dry_run(job, profile, name, env, frozen)
        return 0
    record = _submit(job, profile, name, env, frozen)
    return _wait(record) if args.wait else 0


def job_profile(job, profile, env: dict[str, str]):
    """The profile this job runs under (its supervision settings folded in), once every allocation --min-nodes
    allows splits its global batch."""
    profile = _supervision(job.config.supervision, profile, env)
    for nodes in range(profile.min_nodes or profile.nodes, profile.nodes):
        job.plan.on_nodes(nodes)
    return profile


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


def _print_dry_run(job, profile, name: str, env: dict[str, str], frozen) -> None:
    """The sbatch script (with the hosts the node ledger keeps out and the frozen code it starts from), each node's
    command and the plan, as `submit` would write and run them."""
    import sys
    from pathlib import Path

    from cluster.submission import render_sbatch, step_python, training_parameters
    from launcher.jobdir.layout import JobDir

    job_dir = Path(job.output_dir).resolve()
    container = _container(job, profile, env, frozen)
    parameters = frozen.in_script(training_parameters(profile, name, JobDir(job_dir).slurm, sys.executable, container))
    _exclude_quarantined(parameters, profile, env)
    print(f"# {frozen.describe()} (at submit)")
    spares = f" and {profile.spare_nodes} spare(s)" if profile.spare_nodes else ""
    print(f"# sbatch script for {profile.nodes} node(s){spares} (cluster profile {profile.name}):")
    print(render_sbatch(parameters, JobDir(job_dir).slurm, step_python(container, sys.executable)))
    print("# each node's task runs (FIRST_NODE = first of `scontrol show hostnames \"$SLURM_STEP_NODELIST\"`,")
    print("# RDZV_PORT = 20000 + JOB_ID % 10000):")
    print(_node_line(job, profile, container))
    print(f"# the plan ({JobDir(job_dir).plan} when submitted):")
    print(job.plan.to_yaml().rstrip())
    print("# nothing written, nothing submitted (--dry-run).")


def _exclude_quarantined(parameters: dict, profile, env: dict[str, str]) -> None:
    """What the dry run's sbatch script keeps out: the quarantined hosts the partition can spare (sinfo says
    which); without SLURM there is nothing to keep out."""
    import shutil
    import subprocess

    from cluster.exclusion import exclusion_sentence, quarantined_nodes

    try:
        exclude = quarantined_nodes(profile, env) if shutil.which("sinfo") else []
    except (OSError, subprocess.SubprocessError):
        exclude = []
    if exclude:
        parameters["exclude"] = ",".join(exclude)
        print(f"# {exclusion_sentence(profile, exclude)}")


def _node_line(job, profile, container) -> str:
    """One node's command for the dry run, with placeholders for what only the allocation knows."""
    import sys
    from pathlib import Path

    from cluster.submission import node_command, render_node_command

    wrap = container.wrap(profile.gpus_per_node > 0) if container else []
    argv, extra_env = node_command(job.plan, Path(job.output_dir).resolve(), rdzv_host="FIRST_NODE",
                                   rdzv_port="RDZV_PORT", job_id="JOB_ID", max_restarts=profile.torchrun_restarts,
                                   dist_timeout_s=profile.dist_timeout_s, cpus_per_node=profile.cpus_per_task,
                                   python=container.container.python if container else sys.executable, wrap=wrap)
    return render_node_command(argv, extra_env)


def _container(job, profile, env: dict[str, str], frozen, mount=None):
    """The profile's container for this job, with the job dir (or `mount`, a sweep's dir) and token cache it
    mounts and the frozen code its python imports; None without one."""
    from pathlib import Path

    from cluster.submission import ContainerJob
    from launcher.env import cache_root

    if profile.container is None:
        return None
    cache = cache_root(job.config.data.cache_dir, env).resolve()
    return ContainerJob(profile.container, str(Path(mount or job.output_dir).resolve()), str(cache),
                        source=frozen.import_roots[-1], pythonpath=frozen.roots_path)


def _submit(job, profile, name: str, env: dict[str, str], frozen):
    """Write the job dir, freeze the code into it and sbatch it, unless a job that has not ended owns that dir;
    the record lets `status`, `logs` and `cancel` find the job by its id."""
    from pathlib import Path

    from cluster.sbatch import submit
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
    container = _container(job, profile, env, frozen)
    frozen.freeze(container.container.image if container else None)
    submitted = submit(job_dir, profile, name, env, container, frozen)
    record = JobRecord(job_id=str(submitted.job_id), name=name, output_dir=str(job_dir),
                       log_folder=str(JobDir(job_dir).slurm), nodes=profile.nodes, cluster=profile.name,
                       slurm_conf=SLURM_CONF.get(env))
    record.save()
    plan = job.plan
    print(f"submitted job {record.job_id} ({name}): {plan.nodes} node(s) x {plan.gpus_per_node} "
          f"{'GPU' if plan.device == 'cuda' else 'process'}(es), {plan.strategy}, "
          f"requeues up to {profile.max_requeues} time(s)")
    print(f"  plan:   {JobDir(job_dir).plan}")
    print(f"  {frozen.describe()}")
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


def _run_sweep(args: argparse.Namespace, knobs: dict, flags: list, profile, env: dict[str, str], name: str,
               user) -> int:
    """`--sweep`: every element checked and planned (launcher.sweep), then one job array (cluster.sweep) whose
    elements all run the code frozen once into the sweep dir (`user`: cluster.snapshot.user_code's tree)."""
    from pathlib import Path

    from cluster.snapshot import FrozenCode
    from launcher.env import PYTHONPATH
    from launcher.errors import LaunchError
    from launcher.sweep import prepare_sweep

    if not args.sweep:
        raise LaunchError("--max-parallel throttles a sweep's job array; add --sweep section.key=V1,V2,... or drop it.")
    if profile.restarts_on_spares:
        raise LaunchError("a sweep's elements run without spare nodes (each restarts through the queue); drop "
                          "--spare-nodes (or the profile's spare_nodes) or submit the elements one by one.")
    if args.max_parallel is not None and args.max_parallel < 1:
        raise LaunchError(f"--max-parallel must be a positive integer, not {args.max_parallel}.")
    sweep = prepare_sweep(args.config, args.overrides, args.sweep, flags=flags, knobs=knobs,
                          output_dir=args.output_dir, hardware=profile.hardware())
    profiles = [job_profile(job, profile, env) for job in sweep.jobs]
    frozen = FrozenCode(Path(sweep.dir.root).resolve(), user, PYTHONPATH.get(env))
    container = _sweep_container(sweep, profile, env, frozen)
    if args.dry_run:  # writes nothing: the sweep's elements may be running and reread their dirs on requeue
        _print_sweep_dry_run(sweep, profiles, name, env, container, args.max_parallel, frozen)
        return 0
    record = _submit_sweep(sweep, profiles, name, env, container, args.max_parallel, frozen)
    return _wait_sweep(record, sweep.dir, env) if args.wait else 0


def _sweep_container(sweep, profile, env: dict[str, str], frozen):
    """The one container of the array: the sweep dir mounted (every element's job dir and the array's logs);
    pyxis mounts on the array's one srun line, so every element must read the same token cache."""
    from launcher.errors import LaunchError

    containers = [_container(job, profile, env, frozen, mount=sweep.dir.root) for job in sweep.jobs]
    if len({container.cache_dir for container in containers if container}) > 1:
        raise LaunchError("the sweep's elements read different token caches (data.cache_dir) and its container "
                          "mounts one; sweep another key, or give every element the same data.cache_dir.")
    return containers[0]


def _print_sweep_dry_run(sweep, profiles, name: str, env: dict[str, str], container, max_parallel, frozen) -> None:
    """The array's sbatch script, then each element: its overrides, its job dir, a node's command and its plan."""
    import sys

    from cluster.submission import ARRAY_TASK_PORT_STRIDE, RDZV_PORT_BASE, RDZV_PORT_SPAN, render_sbatch, step_python
    from cluster.sweep import array_parameters

    parameters = frozen.in_script(array_parameters(profiles[0], name, container, len(sweep.jobs), max_parallel,
                                                    sweep.dir.slurm))
    _exclude_quarantined(parameters, profiles[0], env)
    print(f"# {frozen.describe()} (at submit)")
    print(f"# a sweep of {len(sweep.jobs)} element(s), one SLURM job array (cluster profile {profiles[0].name}), "
          f"{parameters['array_parallelism']} at a time; its sbatch script:")
    print(render_sbatch(parameters, sweep.dir.slurm, step_python(container, sys.executable)))
    for index, (element, job, profile) in enumerate(zip(sweep.elements, sweep.jobs, profiles)):
        print(f"# element {index} (array task {index}): {element.label}, in {job.output_dir}")
        print(f"# each node's task runs (JOB_ID = ARRAY_JOB_ID_{index}, RDZV_PORT = {RDZV_PORT_BASE} + (ARRAY_JOB_ID + "
              f"{ARRAY_TASK_PORT_STRIDE * index}) % {RDZV_PORT_SPAN}):")
        print(_node_line(job, profile, container))
        print(f"# its plan:\n{job.plan.to_yaml().rstrip()}")
    print(f"# nothing written, nothing submitted (--dry-run); the sweep's record would be {sweep.dir.record}.")


def _submit_sweep(sweep, profiles, name: str, env: dict[str, str], container, max_parallel, frozen):
    """Write the sweep's record (first: the dir is a sweep's from then on), each element's job dir, sbatch the
    array, then the records `status`, `logs` and `cancel` find the sweep and each element by."""
    from cluster.sbatch import node_task
    from cluster.jobs import JobRecord, active_job_in
    from cluster.sweep import submit_array
    from launcher.env import SLURM_CONF
    from launcher.errors import LaunchError
    from launcher.jobdir.prepare import write_job
    from launcher.jobdir.sweep_dir import SweepRecord

    active = active_job_in(sweep.dir.slurm, env)
    if active:
        raise LaunchError(f"{sweep.dir.root} belongs to sweep element {active[0]}, which is "
                          f"{active[1].state.lower()}; wait for the sweep to end, `llaunch cancel "
                          f"{active[0].partition('_')[0]}`, or choose another --output-dir.")
    profile = profiles[0]
    record = SweepRecord(name=name, cluster=profile.name, elements=sweep.elements)
    record.save(sweep.dir)
    for job in sweep.jobs:
        write_job(job)
    frozen.freeze(container.container.image if container else None)
    tasks = [node_task(job.output_dir, each, container) for job, each in zip(sweep.jobs, profiles)]
    record.array_job_id = submit_array(sweep.dir, tasks, profile, name, env, container, max_parallel, frozen)
    record.save(sweep.dir)
    common = dict(name=name, log_folder=str(sweep.dir.slurm), nodes=profile.nodes, cluster=profile.name,
                  slurm_conf=SLURM_CONF.get(env))
    for index, job in enumerate(sweep.jobs):
        JobRecord(job_id=record.element_job_id(index), output_dir=str(job.output_dir), **common).save()
    JobRecord(job_id=record.array_job_id, output_dir=str(sweep.dir.root), **common).save()  # newest: listed first
    print(f"submitted sweep {record.array_job_id} ({name}): {len(tasks)} element(s) as one job array, each "
          f"{profile.nodes} node(s); at most {max_parallel or len(tasks)} at a time")
    for index, (element, job) in enumerate(zip(sweep.elements, sweep.jobs)):
        print(f"  {record.element_job_id(index)}  {element.label}  ({job.plan.strategy}): {job.output_dir}")
    print(f"  follow: llaunch status {record.array_job_id}   llaunch logs {record.element_job_id(0)} -f   "
          f"llaunch cancel {record.array_job_id}")
    return record


def _wait_sweep(record, sweep_dir, env: dict[str, str]) -> int:
    """`--wait` with `--sweep`: block until every element ends, print the sweep's table; 0 only if all completed."""
    from cluster.sweep import describe_sweep, wait_for_sweep

    try:
        states = wait_for_sweep(record, env)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; sweep {record.array_job_id} keeps running (`llaunch status "
              f"{record.array_job_id}`, `llaunch cancel {record.array_job_id}`).", flush=True)
        return 130
    print("\n".join(describe_sweep(record.array_job_id, sweep_dir, env)))
    return 0 if all(state.state == "COMPLETED" for state in states) else 1
