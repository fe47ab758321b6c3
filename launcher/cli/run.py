"""`llaunch run CONFIG`: plan the job, write DIR/plan.yaml + DIR/config.yaml, and train on this node via torchrun."""

from __future__ import annotations

import argparse
import shlex


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="plan and train a job on this machine (torchrun)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_flags(p)
    p.add_argument("config", help="train config YAML (see examples/)")
    # argparse cannot mix optional flags with trailing positionals under a subcommand, so everything after
    # CONFIG is parsed again in run() with parse_intermixed_args.
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="section.key=value",
                   help="config overrides (e.g. training.learning_rate=1e-4), before or after the flags")
    p.set_defaults(run=run)


def _add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", help="job directory (default: training.output_dir)")
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps")
    p.add_argument("--save-steps", type=int, help="checkpoint every N steps")
    p.add_argument("--strategy", choices=("ddp", "fsdp", "zero1", "zero2", "zero3"), help="force a strategy")
    p.add_argument("--nproc-per-node", type=int, help="processes on this node (default: all GPUs, or 1 on CPU)")
    p.add_argument("--dry-run", action="store_true", help="write the plan and print the torchrun command, do not run")
    p.add_argument("--overwrite", action="store_true", help="delete an existing output directory first")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if DIR holds checkpoints")
    p.add_argument("--resume-from", metavar="PATH", help="resume from this checkpoint directory")


def parse_rest(args) -> argparse.Namespace:
    """Flags and key=value overrides written after CONFIG, in any order."""
    parser = argparse.ArgumentParser(prog="llaunch run CONFIG", add_help=False, argument_default=argparse.SUPPRESS)
    _add_flags(parser)
    parser.add_argument("overrides", nargs="*", default=[])
    return parser.parse_intermixed_args(args.rest, namespace=args)


def flag_overrides(args) -> list[str]:
    """CLI flags are shorthands for config keys; they win over the YAML and over positional overrides."""
    pairs = {
        "training.max_steps": args.max_steps,
        "training.save_steps": args.save_steps,
        "parallel.strategy": args.strategy,
        "parallel.nproc_per_node": args.nproc_per_node,
        "training.resume_from_checkpoint": args.resume_from,
        "training.overwrite_output_dir": True if args.overwrite else None,
        "training.ignore_checkpoints": True if args.no_resume else None,
    }
    return [f"{key}={value}" for key, value in pairs.items() if value is not None]


def run(args) -> int:
    import os

    from launcher.job import prepare_job
    from launcher.torchrun import build_torchrun_argv, run_torchrun

    args = parse_rest(args)
    job = prepare_job(args.config, [*args.overrides, *flag_overrides(args)], output_dir=args.output_dir)
    argv, env = build_torchrun_argv(job.plan, job.output_dir, python=_python(), cpus_per_node=os.cpu_count())
    command = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, argv)])
    if args.dry_run:
        print(command)
        return 0
    plan = job.plan
    print(f"llaunch: {plan.strategy} on {plan.world_size} x {plan.device} ({plan.precision}), "
          f"micro-batch {plan.micro_batch} x accumulation {plan.gradient_accumulation_steps}; output in {job.output_dir}")
    return run_torchrun(argv, {**os.environ, **env})


def _python() -> str:
    import sys

    return sys.executable
