"""`llaunch logs JOB [--rank R] [-f]`: the log of the node that runs rank R (torchrun's output of all its ranks),
found by the line the rank printed as it started."""

from __future__ import annotations

import argparse
import sys
import time


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("logs", help="print (or follow) a submitted job's logs")
    p.add_argument("job", help="job id")
    p.add_argument("--rank", type=int, default=0, help="global rank whose node's log to show (default 0)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the job ends")
    p.set_defaults(run=run)


def _procs_per_node(output_dir: str) -> int:
    from launcher.jobdir.layout import JobDir
    from launcher.planning.plan import Plan

    plan_path = JobDir(output_dir).plan
    return Plan.load(plan_path).gpus_per_node if plan_path.exists() else 1


def _refuse_sweep(record) -> None:
    """A sweep's elements each have their own logs: the sweep's id names none of them."""
    from launcher.errors import LaunchError
    from launcher.jobdir.sweep_dir import SweepDir, SweepRecord

    if SweepDir(record.output_dir).is_sweep:
        elements = len(SweepRecord.load(SweepDir(record.output_dir)).elements)
        raise LaunchError(f"job {record.job_id} is a sweep of {elements} elements, each with its own logs; give one "
                          f"element's id, e.g. `llaunch logs {record.job_id}_0`.")


def run(args: argparse.Namespace) -> int:
    from cluster.jobs import job_state, load_record, node_of_rank, refuse_never_starting
    from launcher.errors import LaunchError

    record = load_record(args.job)
    _refuse_sweep(record)
    procs = _procs_per_node(record.output_dir)
    if not 0 <= args.rank < record.nodes * procs:
        raise LaunchError(f"rank {args.rank} is not in job {record.job_id} (ranks 0-{record.nodes * procs - 1}).")
    found = node_of_rank(record, args.rank)
    node = found if found is not None else args.rank // procs  # not started yet: the usual placement
    paths = record.log_paths(node)
    if not args.follow:
        missing = [p for p in paths if not p.exists()]
        if len(missing) == len(paths):
            print(f"job {record.job_id} has not written logs yet ({paths[0].parent}); it may still be pending.")
            return 0
        for path in paths:
            if path.exists():
                print(f"==> {path} <==")
                sys.stdout.write(path.read_text(errors="replace"))
        return 0
    offsets = {p: 0 for p in paths}
    finished = False
    while not finished:
        state = job_state(record.job_id, record.env())
        finished = state.finished or state.state == "UNKNOWN"  # one last read after the end
        refuse_never_starting(record.job_id, state)
        for path in paths:
            if path.exists():
                with path.open("rb") as handle:
                    handle.seek(offsets[path])
                    chunk = handle.read()
                offsets[path] += len(chunk)
                sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()
        if not finished:
            time.sleep(1.0)
    return 0
