"""`llaunch status [JOB]`: state, nodes and requeues from SLURM; step and loss from the job's metrics.jsonl. A
sweep's id (`llaunch submit --sweep`) shows one table of its elements (cluster.sweep)."""

from __future__ import annotations

import argparse
from pathlib import Path

RECENT = 10
# States in which the job's own logs say why it ended (CANCELLED was someone's decision).
FAILED_STATES = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("status", help="state, nodes, requeues, last step and loss of submitted jobs")
    p.add_argument("job", nargs="?", help="job id (default: the %d most recent jobs)" % RECENT)
    p.set_defaults(run=run)


def describe(job_id: str | None) -> list[str]:
    """The lines `llaunch status JOB` prints; also what `submit --wait` prints at the end."""
    from cluster.jobs import job_state, last_error, load_record
    from cluster.snapshot import status_line
    from launcher.observe.metrics_file import last_metrics
    from launcher.runtime.rank_exits import latest_failure
    from launcher.runtime.watchdog import latest_hang
    from launcher.cli.goodput import summary_line
    from launcher.jobdir.sweep_dir import SweepDir

    record = load_record(job_id)
    if SweepDir(record.output_dir).is_sweep:
        from cluster.sweep import describe_sweep

        return describe_sweep(record.job_id, SweepDir(record.output_dir), record.env())
    state = job_state(record.job_id, record.env())
    lines = [f"job {record.job_id} ({record.name}): {state.state}"
             + (f" on {state.nodes}" if state.nodes else "")
             + (f", requeued {state.restarts} time(s)" if state.restarts else "")
             + (f", exit code {state.failed_exit}" if state.finished and state.failed_exit else "")]
    if state.reason and not state.finished:
        lines.append(f"  waiting: {state.reason}")
    metrics = last_metrics(record.output_dir)
    saved = _newest_checkpoint(record.output_dir)
    if metrics or saved is not None:
        lines.append((f"  step {metrics['step']}  loss {float(metrics['loss']):.4f}  " if metrics else "  ")
                     + (f"saved: step {saved}" if saved is not None else "saved: no checkpoint yet"))
    if metrics:
        if metrics.get("stragglers"):
            lines.append(f"  stragglers: rank(s) {', '.join(map(str, metrics['stragglers']))} (busy s per rank "
                         f"{metrics['busy_s']})")
    code = status_line(record.output_dir)  # the commit the job runs, whatever the checkout holds now
    if code:
        lines.append(f"  {code}")
    goodput = summary_line(Path(record.output_dir))
    if goodput:
        lines.append(f"  {goodput}   (llaunch goodput {record.job_id})")
    hang = latest_hang(record.output_dir)
    if hang:
        lines.append(f"  {hang}")
    failure = latest_failure(record.output_dir)
    if failure:
        lines.append(f"  {failure}")
    if state.state in FAILED_STATES:
        error = last_error(record.log_paths())
        if error:
            lines.append(f"  error: {error}")
    lines.append(f"  output: {record.output_dir}")
    lines.append(f"  logs:   llaunch logs {record.job_id}   ({record.log_folder})")
    return lines


def _newest_checkpoint(output_dir: str) -> int | None:
    """The step of the newest complete checkpoint: what a requeue or rerun resumes from."""
    from launcher.jobdir.checkpoint_store import list_checkpoints

    steps = [info.step for info in list_checkpoints(output_dir) if info.complete]
    return max(steps) if steps else None


def run(args: argparse.Namespace) -> int:
    from cluster.sweep import is_element_id
    from launcher.env import records_dir

    if args.job is not None:
        print("\n".join(describe(args.job)))
        return 0
    folder = records_dir()
    records = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime) if folder.exists() else []
    recent = [path for path in records if not is_element_id(path.stem)][-RECENT:]  # a sweep's row shows them
    if not recent:
        print("no jobs submitted yet; submit one with `llaunch submit CONFIG --nodes 2`.")
        return 0
    for path in reversed(recent):
        print("\n".join(describe(path.stem)))
    return 0
