"""`llaunch checkpoints OUTPUT`: which checkpoints a run has, which are complete, which is best."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("checkpoints", help="list a run's checkpoints: step, time, size, complete, best",
                              description="List OUTPUT/checkpoints with step, time, size, completeness and the best one.")
    p.add_argument("output_dir", metavar="OUTPUT", help="the run's --output-dir")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256 (reads all the data); exit 1 if any checkpoint is damaged")
    p.add_argument("--greater-is-better", action=argparse.BooleanOptionalAction, default=None,
                   help="how to rank the saved metric (default: higher is better unless it is a loss)")
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from launcher.errors import LaunchError
    from launcher.jobdir.checkpoint_store import best_checkpoint, list_checkpoints
    from launcher.jobdir.layout import JobDir

    if not Path(args.output_dir).is_dir():
        raise LaunchError(f"{args.output_dir} does not exist; pass the --output-dir of a run.")
    infos = list_checkpoints(args.output_dir, checksums=args.verify)
    console = Console()
    if not infos:
        console.print(f"no checkpoints under {JobDir(args.output_dir).checkpoints}")
        return 0
    best = best_checkpoint(infos, args.greater_is_better)
    latest = next((info for info in reversed(infos) if info.complete), None)
    # Without --verify only sizes were compared: a flipped byte still looks complete until its sha256 is read.
    resume_note = "resume point" if args.verify else "resume point (unverified)"
    table = Table(title=f"checkpoints in {JobDir(args.output_dir).checkpoints}")
    for column in ("step", "created (UTC)", "size", "ranks", "strategy", "complete", "metric", "note"):
        table.add_column(column, justify="right" if column in ("step", "size", "ranks") else "left")
    for info in infos:
        manifest = info.manifest or {}
        notes = [n for n, flag in (("best", info is best), (resume_note, info is latest)) if flag]
        table.add_row(
            str(info.step), info.created.replace("+00:00", ""),
            f"{info.size_bytes / 2**20:,.1f} MiB" if info.size_bytes else "-",
            str(manifest.get("world_size", "-")), manifest.get("strategy", "-"),
            "[green]yes[/green]" if info.complete else f"[red]no[/red]: {info.problem}",
            f"{info.metric_name}={info.metric:.4g}" if info.metric is not None else "-",
            ", ".join(notes),
        )
    console.print(table)
    damaged = [info for info in infos if not info.complete]
    if args.verify and damaged:
        console.print(f"{len(damaged)} of {len(infos)} checkpoints are damaged or incomplete: "
                      f"{', '.join(info.path.name for info in damaged)}")
        return 1
    return 0
