"""`llaunch cancel JOB`: scancel on the cluster the job was submitted to."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("cancel", help="cancel a submitted job (its checkpoints stay)")
    p.add_argument("job", help="job id")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from cluster.jobs import cancel, job_state, load_record

    record = load_record(args.job)
    state = job_state(record.job_id, record.env())
    if state.finished or state.state == "UNKNOWN":
        print(f"job {record.job_id} had already ended ({state.state}); nothing to cancel. "
              f"Its checkpoints are in {record.output_dir}/checkpoints.")
        return 0
    cancel(record.job_id, record.env())
    print(f"cancelled job {record.job_id}; its checkpoints stay in {record.output_dir}/checkpoints "
          f"and a new submit with the same --output-dir resumes from them.")
    return 0
