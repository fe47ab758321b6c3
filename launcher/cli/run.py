"""`llaunch run CONFIG`: plan the job, write DIR/plan.yaml + DIR/config.yaml, and train on this node via torchrun."""

from __future__ import annotations

import argparse
import shlex
import sys

from launcher.knobs import RUN, add_knob_flags, cli_knobs, config_overrides


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
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command, do not run; writes the plan "
                   "only into a new or empty directory, never changes an existing run")
    add_knob_flags(p, RUN)


def parse_rest(args) -> argparse.Namespace:
    """Flags and key=value overrides written after CONFIG, in any order."""
    parser = argparse.ArgumentParser(prog="llaunch run CONFIG", add_help=False, argument_default=argparse.SUPPRESS)
    _add_flags(parser)
    parser.add_argument("overrides", nargs="*", default=[])
    return parser.parse_intermixed_args(args.rest, namespace=args)


def run(args) -> int:
    import os

    from cluster.profile import DEFAULT_PROFILE
    from launcher import env as variables
    from launcher.jobdir.prepare import prepare_job, write_job
    from launcher.observe import event_ledger, history
    from launcher.observe.node_ledger import NodeLedger
    from launcher.runtime import node
    from launcher.runtime.terminal import outlive_the_terminal
    from launcher.runtime.torchrun import build_torchrun_argv
    from launcher.runtime.watchdog_config import WatchdogConfig
    from launcher.train.faults import faults_from_env

    outlive_the_terminal()  # the run reports its end even after its terminal closed
    args = parse_rest(args)
    faults_from_env()
    job = prepare_job(args.config, args.overrides, flags=config_overrides(args), knobs=cli_knobs(args),
                      output_dir=args.output_dir, write=False)
    watchdog_config = WatchdogConfig.resolve(config=job.config.supervision.watchdog)
    timeout = variables.dist_timeout_s(config=job.config.supervision.dist_timeout_s)
    argv, env = build_torchrun_argv(job.plan, job.output_dir, python=_python(), cpus_per_node=len(os.sched_getaffinity(0)))
    env.update({variables.DIST_TIMEOUT_S.name: f"{timeout:g}"} if timeout else {})
    if args.dry_run:
        return _dry_run(job, argv, env)
    lock = write_job(job, keep_lock=True)  # held until this process ends: the ranks need not take it
    history.register(job.output_dir)  # the ranks only read the cluster's history
    env[variables.RUN_LOCK_HELD.name] = str(job.output_dir)
    launch = node.NodeRun(job.output_dir, argv, {**os.environ, **env}, event_ledger.new_incarnation_id(),
                          watchdog_config, beacon_key="run")
    # from the command's start: reading and planning the job is start-up
    node.record_launch(job.output_dir, launch.incarnation, nodes=1, how="llaunch run", t=args.started_at)
    plan = job.plan
    print(f"llaunch: {plan.strategy} on {plan.world_size} x {plan.device} ({plan.precision}), "
          f"micro-batch {plan.micro_batch} x accumulation {plan.gradient_accumulation_steps}; output in {job.output_dir}")
    try:
        outcome = node.supervise(launch, node.SignalLog().install())
        code = outcome.launcher_code()
        code = 0 if code and _finished(job.output_dir, launch.incarnation) else code
        node.record_outcome(launch, outcome, code)
        verdict = node.record_node_ledger(launch, outcome, NodeLedger.for_profile(DEFAULT_PROFILE))
        if outcome.hang is not None:
            print(f"llaunch: {verdict.why}; the ranks were killed", file=sys.stderr)
        return code
    finally:
        lock.release()


def _dry_run(job, argv: list[str], env: dict[str, str]) -> int:
    """Print the torchrun command. An existing run is left alone (its ranks reread it); a new directory gets the
    plan to read."""
    from launcher.jobdir.prepare import is_run_dir, write_job

    existing = is_run_dir(job.output_dir)
    if not existing:
        write_job(job)
    print(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, argv)]))
    if existing:
        print(f"# dry run: {job.output_dir} already holds a run and was left as it is (plan and config "
              f"unchanged, nothing removed).")
    return 0


def _finished(job_dir, incarnation: str) -> bool:
    """The ranks of this launch wrote final/: a stop signal (or anything else) that came after that ended a
    complete run, which is not to be requeued, not a preemption and not a failure."""
    from launcher.observe import event_ledger

    if not any(e["kind"] == event_ledger.FINAL_SAVED and e.get("inc") == incarnation for e in event_ledger.read(job_dir)):
        return False
    print(f"llaunch: the run had finished (final model saved) when it was stopped; {job_dir} is complete.",
          file=sys.stderr)
    return True


def _python() -> str:
    return sys.executable
