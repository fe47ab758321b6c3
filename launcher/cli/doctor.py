"""`llaunch doctor [CONFIG] [--nodes K] [--cluster PROFILE] [--json]`: the preflight checks, on this machine or,
with --nodes / --cluster, as a short SLURM job on K nodes. One line per check per node; exit 3 when one fails.
"""

from __future__ import annotations

import argparse

from launcher.knobs import DOCTOR, add_knob_flags


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="check nodes, network, storage, software and GPUs before a job runs")
    p.add_argument("config", nargs="?", help="train config YAML: checks space, GPUs and config against its plan")
    add_knob_flags(p, DOCTOR)  # --nodes: run as a SLURM job on this many nodes (the profile's with --cluster)
    p.add_argument("--cluster", help="cluster profile for the SLURM job (default: local when --nodes is given)")
    p.add_argument("--output-dir", help="job dir to check and write doctor/node-N.json into (default: the "
                                        "config's output_dir, else ./llaunch-doctor)")
    p.add_argument("--json", action="store_true", help="print every node's report as JSON instead of lines")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json
    import time

    from launcher.errors import EXIT_CHECK_FAILED

    profile, env = _slurm_profile(args)
    plan, job_dir, keep, trainable = _job_facts(args, profile)
    results = _results_dir(job_dir)
    start = time.monotonic()
    if profile is not None:
        from cluster.doctor.slurm import DoctorTask, run_doctor_job

        reports = run_doctor_job(profile, env, DoctorTask(str(job_dir), plan.to_dict() if plan else None, keep, trainable))
    else:
        reports = [_run_here(job_dir, plan, keep, trainable)]
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        for report in reports:
            print("\n".join(report.lines()))
    failed = [r.failure_sentence() for r in reports if r.failed]
    if not args.json:
        took = f"in {time.monotonic() - start:.0f} s"
        print(f"\n{len(failed)} node(s) failed a check {took} (exit {EXIT_CHECK_FAILED})." if failed
              else f"\nall checks passed on {len(reports)} node(s) {took}; results in {results}.")
    return EXIT_CHECK_FAILED if failed else 0


def _slurm_profile(args: argparse.Namespace):
    """(profile, SLURM environment) when the checks run as a SLURM job (--nodes or --cluster), else (None, None)."""
    if args.nodes is None and args.cluster is None:
        return None, None
    from cluster.slurm_checks import check_partition, slurm_reachable
    from cluster.local import slurm_env
    from cluster.profile import load_profile

    profile = load_profile(args.cluster or "local").replace(nodes=args.nodes)
    env = slurm_env(profile.local)
    slurm_reachable(env)
    check_partition(profile, env)
    return profile, env


def _job_facts(args: argparse.Namespace, profile):
    """(plan, job dir, checkpoints kept, trainable parameters) of the config, planned for the profile's nodes;
    without a config only the machine is checked."""
    from pathlib import Path

    if not args.config:
        return None, Path(args.output_dir or "llaunch-doctor").resolve(), 1, 0
    from cluster.doctor.node import job_facts
    from launcher.jobdir.prepare import prepare_job

    job = prepare_job(args.config, output_dir=args.output_dir, write=False,
                      **({"knobs": {"nodes": profile.nodes, "gpus_per_node": profile.gpus_per_node or None},
                          "hardware": profile.hardware()} if profile else {}))
    return (job.plan, Path(job.output_dir), *job_facts(job.config, job.plan))


def _results_dir(job_dir):
    """JOB_DIR/doctor, made here, before any node is asked to write there."""
    import os

    from launcher.jobdir.layout import JobDir
    from launcher.errors import LaunchError

    results = JobDir(job_dir).doctor
    try:
        results.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LaunchError(f"cannot create {results} ({err.strerror}); choose another --output-dir.") from None
    if not os.access(results, os.W_OK):
        raise LaunchError(f"{results} is not writable; choose another --output-dir.")
    return results


def _run_here(job_dir, plan, keep: int, trainable: int):
    """The checks on this machine alone: a single node rendezvouses on any free port (torchrun --standalone)."""
    import socket

    from cluster.doctor.node import NodeContext, run_node

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return run_node(NodeContext(job_dir, 0, [socket.gethostname()], ["127.0.0.1"], port, plan=plan,
                                keep_checkpoints=keep, trainable_params=trainable))
