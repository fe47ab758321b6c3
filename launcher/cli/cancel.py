"""`llaunch cancel JOB`: scancel on the cluster the job was submitted to; a sweep's id ends all its elements."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("cancel", help="cancel a submitted job (its checkpoints stay)")
    p.add_argument("job", help="job id")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from cluster.jobs import cancel, job_state, load_record
    from launcher.jobdir.sweep_dir import SweepDir

    record = load_record(args.job)
    if SweepDir(record.output_dir).is_sweep:
        return _cancel_sweep(record, SweepDir(record.output_dir))
    state = job_state(record.job_id, record.env())
    if state.finished or state.state == "UNKNOWN":
        print(f"job {record.job_id} had already ended ({state.state}); nothing to cancel. "
              f"Its checkpoints are in {record.output_dir}/checkpoints.")
        return 0
    cancel(record.job_id, record.env())
    print(f"cancelled job {record.job_id}; its checkpoints stay in {record.output_dir}/checkpoints "
          f"and a new submit with the same --output-dir resumes from them.")
    return 0


def _cancel_sweep(record, sweep_dir) -> int:
    """scancel the sweep's array: every element still pending or running ends; their checkpoints stay."""
    from cluster.sweep import cancel_sweep
    from launcher.jobdir.sweep_dir import SweepRecord

    ended = cancel_sweep(SweepRecord.load(sweep_dir), record.env())
    if not ended:
        print(f"sweep {record.job_id} had already ended; nothing to cancel. Its elements are in {sweep_dir.root}.")
        return 0
    print(f"cancelled sweep {record.job_id}: {', '.join(ended)}; each element's checkpoints stay in its directory "
          f"under {sweep_dir.root}, and submitting the same sweep there again resumes them.")
    return 0
