"""`llaunch submit CONFIG --nodes K`: plan for the cluster's nodes, write plan.yaml, sbatch through submitit.

Defaults come from a cluster profile (`--cluster NAME`, cluster/profiles/NAME.yaml); every flag overrides
its field. The job requeues itself after a preemption or time-limit signal and resumes from its newest
checkpoint; `llaunch status`, `logs` and `cancel` find it again by its id.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("submit", help="submit a training job to SLURM (multi-node torchrun, auto-requeue)")
    p.add_argument("config", help="train config YAML (see examples/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override config values, e.g. training.learning_rate=1e-4")
    p.add_argument("--cluster", default="local", help="cluster profile: a name under cluster/profiles or a YAML path (default: local)")
    p.add_argument("--nodes", type=int, help="number of nodes (profile default)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node; 0 = CPU nodes on gloo (profile default)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--time", help="time limit, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--constraint", help="node features, e.g. h100")
    p.add_argument("--max-requeues", type=int, help="how many preemptions/time limits the job survives")
    p.add_argument("--output-dir", help="where plan, checkpoints, metrics and logs go (default: the config's output_dir)")
    p.add_argument("--max-steps", type=int, help="override training.max_steps")
    p.add_argument("--save-steps", type=int, help="override training.save_steps")
    p.add_argument("--wait", action="store_true", help="block until the job ends; exit 0 only if it completed")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and each node's torchrun command; submit nothing")
    p.set_defaults(run=run)


def _profile_hardware(profile):
    """The Hardware the planner sees: the profile's nodes and GPUs, not this login node's."""
    from launcher.hardware import Hardware

    ram = int(profile.node_ram_gb * 2**30)
    if profile.gpus_per_node:
        return Hardware(nodes=profile.nodes, cpu_cores=profile.cpus_per_task, ram_bytes=ram,
                        gpus_per_node_override=profile.gpus_per_node, gpu_name_override=profile.gpu_name,
                        gpu_mem_override=int(profile.gpu_mem_gb * 2**30))
    return Hardware(nodes=profile.nodes, cpu_cores=profile.cpus_per_task, ram_bytes=ram)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from cluster.executor import slurm_reachable, submit
    from cluster.jobs import JobRecord, wait_for_end
    from cluster.local import slurm_env
    from cluster.profile import load_profile
    from cluster.submission import job_name, node_command, render_node_command, render_sbatch, slurm_parameters
    from launcher.job import prepare_job

    profile = load_profile(args.cluster).replace(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition, account=args.account,
        qos=args.qos, time=args.time, constraint=args.constraint, max_requeues=args.max_requeues,
    )
    env = slurm_env(profile.local)
    if not args.dry_run:
        slurm_reachable(env)  # before anything is written
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"training.max_steps={args.max_steps}")
    if args.save_steps is not None:
        overrides.append(f"training.save_steps={args.save_steps}")
    job = prepare_job(args.config, overrides, output_dir=args.output_dir, nodes=profile.nodes,
                      gpus_per_node=profile.gpus_per_node or None, hardware=_profile_hardware(profile))
    job_dir = Path(job.output_dir).resolve()
    name = job_name(f"llaunch-{Path(args.config).stem}")
    params = slurm_parameters(profile, name)

    if args.dry_run:
        print(f"# sbatch script for {profile.nodes} node(s) (cluster profile {profile.name}):")
        print(render_sbatch(params, job_dir / "slurm", sys.executable))
        argv, extra_env = node_command(job.plan, job_dir, rdzv_host="FIRST_NODE", rdzv_port="RDZV_PORT",
                                       job_id="JOB_ID", max_restarts=profile.max_restarts,
                                       dist_timeout_s=profile.dist_timeout_s, cpus_per_node=profile.cpus_per_task,
                                       python=sys.executable)
        print("# each node's task runs (FIRST_NODE = first of `scontrol show hostnames \"$SLURM_JOB_NODELIST\"`,")
        print(f"# RDZV_PORT = 20000 + JOB_ID % 10000):")
        print(render_node_command(argv, extra_env))
        print(f"# plan written to {job_dir / 'plan.yaml'}; nothing submitted (--dry-run).")
        return 0

    submitted = submit(job_dir, profile, name, env)
    record = JobRecord(job_id=str(submitted.job_id), name=name, output_dir=str(job_dir),
                       log_folder=str(job_dir / "slurm"), nodes=profile.nodes, cluster=profile.name,
                       slurm_conf=env.get("SLURM_CONF", ""))
    record.save()
    plan = job.plan
    print(f"submitted job {record.job_id} ({name}): {plan.nodes} node(s) x {plan.gpus_per_node} "
          f"{'GPU' if plan.device == 'cuda' else 'process'}(es), {plan.strategy}, requeues up to {profile.max_requeues} time(s)")
    print(f"  plan:   {job_dir / 'plan.yaml'}")
    print(f"  logs:   {record.log_paths(0)[0]}  (all nodes: {record.log_folder})")
    print(f"  follow: llaunch status {record.job_id}   llaunch logs {record.job_id} -f   llaunch cancel {record.job_id}")
    if not args.wait:
        return 0
    state = wait_for_end(record.job_id, record.env())
    from launcher.cli.status import describe

    print("\n".join(describe(record.job_id)))
    return 0 if state.state == "COMPLETED" else 1
