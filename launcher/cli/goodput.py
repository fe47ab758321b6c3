"""`llaunch goodput JOB|DIR`: where the job's wall time went (productive training and each kind of badput), its
MTBF and save cost, the checkpoint interval they suggest, and what the job would get at 10x / 100x nodes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from launcher.errors import LaunchError

WHAT_IF = (1, 10, 100)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("goodput", help="where a job's time went, and the checkpoint interval it suggests",
                              description=__doc__)
    p.add_argument("job", metavar="JOB|DIR", help="a job id from `llaunch submit`, or a job directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw the timeline, one lane per incarnation")
    p.set_defaults(run=run)


def job_dir(job: str) -> Path:
    """A directory as given, else the output directory of the submitted job with that id."""
    if Path(job).is_dir():
        return Path(job)
    if "/" in job or Path(job).exists():
        raise LaunchError(f"{job} is not a directory; give a job directory or the id of a submitted job.")
    from cluster.jobs import load_record

    return Path(load_record(job).output_dir)


def load_report(directory: Path):
    from launcher.observe import goodput
    from launcher.jobdir.layout import JobDir
    from launcher.observe import event_ledger

    events = event_ledger.read(directory)
    if not events:
        raise LaunchError(f"{directory} has no event ledger ({JobDir(directory).events.name}); it has not started yet, or an "
                          f"llaunch without goodput ran it.")
    return goodput.analyse(events, event_ledger.launcher_alive(events))


def suggestion(report):
    """The interval the measurements ask for (None until a save was measured)."""
    from launcher.observe import goodput

    if report.save_cost_s is None:
        return None
    mtbf, source = goodput.estimate_mtbf(report.running_s, report.failures, report.nodes)
    return goodput.choose_interval(report.save_cost_s, report.restart_cost_s or 0.0, mtbf, source)


def summary_line(directory: Path) -> str | None:
    """One line for `llaunch status`, or None when the job has no ledger yet."""
    from launcher.observe import goodput
    from launcher.observe import event_ledger

    try:
        events = event_ledger.read(directory)
    except LaunchError as err:
        return f"goodput unknown: {err}"
    if not events:
        return None
    report = goodput.analyse(events, event_ledger.launcher_alive(events))
    return (f"goodput {report.goodput:.1%} of {_duration(report.wall_s)} over {len(report.incarnations)} "
            f"incarnation(s): queue {_duration(report.seconds['queue'])}, restore "
            f"{_duration(report.seconds['restore'])}, lost {_duration(report.seconds['lost'])}")


def run(args: argparse.Namespace) -> int:
    from launcher.observe import goodput

    directory = job_dir(args.job)
    if args.plot:
        from launcher.cli.plan import _check_plot_path

        _check_plot_path(args.plot)
    report = load_report(directory)
    suggested = suggestion(report)
    cadences = {"current": report.interval_s, "suggested": suggested.interval_s if suggested else None}
    what_if = {name: goodput.what_if(report, interval, WHAT_IF) for name, interval in cadences.items() if interval}
    if args.json:
        print(json.dumps({**report.to_dict(), "suggested": vars(suggested) if suggested else None,
                          "what_if_ettr": what_if}, indent=1, default=str, allow_nan=False))
    else:
        print("\n".join(describe(directory, report, suggested, cadences, what_if)))
    if args.plot:
        from launcher.observe.goodput_plot import plot_timeline

        plot_timeline(args.plot, f"{directory}: goodput {report.goodput:.1%} of {_duration(report.wall_s)}", report)
        print(f"wrote {args.plot}")
    return 0


def describe(directory, report, suggested, cadences, what_if) -> list[str]:
    failures = f"{report.failures} failure(s)" if report.failures else "no failure"
    lines = [f"{directory}: goodput {report.goodput:.1%} of {_duration(report.wall_s)} wall, "
             f"{len(report.incarnations)} incarnation(s), {failures}"]
    for category, seconds in report.seconds.items():
        if seconds > 0:
            lines.append(f"  {category:<11} {_duration(seconds):>9}  {seconds / report.wall_s:6.1%}")
    if report.steps_lost:
        lines.append(f"  progress lost: {report.steps_lost} step(s) done again after failures")
    mtbf = f"{_duration(report.mtbf_s)} measured" if report.mtbf_s is not None else "not measured yet (no failure)"
    background = f" (+ {_seconds(report.save_background_s)} in the background)" if report.save_background_s else ""
    lines.append(f"  MTBF {mtbf}; save cost {_seconds(report.save_cost_s)} blocking{background}; restart cost "
                 f"{_seconds(report.restart_cost_s)}; step {_seconds(report.step_time_s)}")
    if suggested:
        lines.append(f"  cadence now: a save every {_seconds(cadences['current'])} of training; suggested: "
                     f"{suggested.describe()}")
    if what_if:
        lines.append("  what if (Meta's ETTR model, same per-node failure rate): "
                     + "   ".join(f"{factor}x nodes" for factor in WHAT_IF))
        for name, ratios in what_if.items():
            lines.append(f"    {name:<9} every {_seconds(cadences[name]):>7}: "
                         + "   ".join(f"{ratios[factor]:>{len(str(factor)) + 5}.0%}" for factor in WHAT_IF))
    return lines


def _seconds(value: float | None) -> str:
    return "?" if value is None else f"{value:.3g} s" if value < 100 else _duration(value)


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} m" if hours else f"{minutes} m {rest:02d} s" if minutes else f"{seconds:.1f} s"
