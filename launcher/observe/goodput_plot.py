"""`llaunch goodput --plot FILE.png`: the job's timeline, one lane per incarnation, coloured by category
(matplotlib, Agg; imported only for --plot)."""

from __future__ import annotations

from pathlib import Path

from launcher.observe.goodput import CATEGORIES, Report
from launcher.planning.plan_plot import _save, plt


def plot_timeline(path: str | Path, title: str, report: Report) -> Path:
    """Horizontal bars along wall time; the legend lists only the categories that occur, with their share."""
    lanes = max((p.lane for p in report.pieces), default=0) + 1
    fig, ax = plt.subplots(figsize=(12, 0.6 * lanes + 2.0))
    origin = min((p.start for p in report.pieces), default=0.0)
    for category, color in CATEGORIES.items():
        for lane in range(lanes):
            spans = [(p.start - origin, p.seconds) for p in report.pieces if p.category == category and p.lane == lane]
            if spans:
                ax.broken_barh(spans, (lane - 0.38, 0.76), facecolors=color, edgecolor="none")
    for inc in report.incarnations:
        ended = inc.cause or "running or killed unseen"
        ax.text(1.005, inc.lane, f" {ended}", transform=ax.get_yaxis_transform(), va="center", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=color, ec="grey", lw=0.3) for category, color in CATEGORIES.items()
               if report.seconds[category] > 0]
    labels = [f"{category} {report.seconds[category] / report.wall_s:.0%}" for category in CATEGORIES
              if report.seconds[category] > 0]
    ax.legend(handles, labels, ncol=min(len(labels), 6), loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=9,
              frameon=False)
    ax.set_yticks(range(lanes), [f"incarnation {lane + 1}" for lane in range(lanes)], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, report.wall_s)
    ax.set_xlabel("seconds since the job's first event")
    ax.set_title(title, pad=34)
    return _save(fig, path, f"goodput {report.goodput:.1%}")
