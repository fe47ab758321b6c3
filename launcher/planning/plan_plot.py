"""`llaunch plan --plot FILE.png`: the plan's memory as a picture (matplotlib, Agg; imported only for --plot).

Two pictures: the per-GPU memory of each candidate stacked by component against the card's limit, the chosen
one marked; and, for the "what it takes" answer, memory per GPU against GPU count per strategy, with the
common cards' limits as lines to read the crossing points off.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen first

from launcher.errors import LaunchError  # noqa: E402
from launcher.planning.hardware import require_gpu_name  # noqa: E402

GiB = 2**30
# Bar segments, bottom to top: the breakdown's terms (memory.MemoryBreakdown.at_peak) grouped as people name them.
COMPONENTS = (
    ("weights", ("frozen_weights", "weights"), "#4c72b0"),
    ("grads", ("grads",), "#dd8452"),
    ("optimizer", ("optimizer", "optimizer_scratch"), "#55a868"),
    ("activations", ("activations",), "#c44e52"),
    ("logits", ("logits_loss",), "#8172b3"),
    ("buffers", ("comm_buffers", "weight_copies"), "#937860"),
    ("reserve", ("context_reserve",), "#bbbbbb"),
)
STRATEGY_STYLE = {"ddp": "#4c72b0", "fsdp": "#dd8452", "hsdp": "#937860", "zero1": "#55a868", "zero2": "#c44e52", "zero3": "#8172b3"}


def plot_candidates(path: str | Path, title: str, candidates, chosen_label: str) -> Path:
    """Horizontal stacked bars, one per candidate (what the table shows), the limit as a line, the chosen bold."""
    fig, ax = plt.subplots(figsize=(11, 0.5 * len(candidates) + 2.2))
    labels = [c.label for c in candidates]
    rows = range(len(candidates))
    left = [0.0] * len(candidates)
    for name, terms, color in COMPONENTS:
        widths = [sum(c.memory.at_peak.get(t, 0) for t in terms) / GiB for c in candidates]
        ax.barh(rows, widths, left=left, color=color, label=name, edgecolor="white", linewidth=0.5)
        left = [a + b for a, b in zip(left, widths)]
    limit = candidates[0].limit_bytes / GiB
    right = limit * 1.6  # bars far over the limit run off the right edge; their total is printed there
    ax.axvline(limit, color="black", linestyle="--", linewidth=1.4, label=f"limit {limit:.1f} GiB")
    for row, candidate, total in zip(rows, candidates, left):
        chosen = candidate.label == chosen_label
        text = f"{total:.1f}" + ("  \u25c0 chosen" if chosen else "" if candidate.fits else "  does not fit")
        if total > right * 0.8:
            ax.text(right * 0.99, row, f"{total:,.0f} GiB \u2192  does not fit", va="center", ha="right", fontsize=9,
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.5})
        else:
            ax.text(total, row, " " + text, va="center", fontsize=9, fontweight="bold" if chosen else "normal")
        if chosen:
            ax.barh(row, total, fill=False, edgecolor="black", linewidth=1.6)
    ax.set_yticks(list(rows), labels, fontsize=9)
    for tick, candidate in zip(ax.get_yticklabels(), candidates):
        if candidate.label == chosen_label:
            tick.set_fontweight("bold")
    ax.invert_yaxis()  # the table's order, top down
    ax.set_xlim(0, right)
    ax.set_xlabel("GiB per GPU at the step's peak (reserved: allocated + allocator slack + CUDA context)")
    ax.set_title(title, pad=28)
    ax.legend(ncol=len(COMPONENTS) + 1, loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=9, frameon=False)
    return _save(fig, path, f"chosen: {chosen_label}")


def plot_sizing(path: str | Path, title: str, curves: dict, rows, gpus: tuple[str, ...]) -> Path:
    """One panel per method: memory per GPU against GPU count per strategy, the cards' limits, the table's picks."""
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, len(curves), figsize=(5.6 * len(curves), 5.2), sharey=True, squeeze=False)
    limits: dict[float, list[str]] = {}  # cards with the same memory share one line
    for gpu in gpus:
        limit = require_gpu_name(gpu).memory_bytes / GiB
        same = next((known for known in limits if abs(known - limit) < 0.03 * limit), limit)
        limits.setdefault(same, []).append(gpu)
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for ax, (method, by_strategy) in zip(axes[0], curves.items()):
        for strategy, points in by_strategy.items():
            ax.plot([n for n, _ in points], [b / GiB for _, b in points], marker="o", markersize=3,
                    color=STRATEGY_STYLE[strategy], label=strategy)
        for limit, names in limits.items():
            ax.axhline(limit, color="grey", linestyle=":", linewidth=0.9)
            ax.text(1.01, limit, " / ".join(names), transform=ax.get_yaxis_transform(), fontsize=8, va="center",
                    color="dimgrey")
        picks: dict[tuple[int, str], list[str]] = {}
        for row in rows:
            if row.method == method and row.plan is not None:
                picks.setdefault((row.gpus, row.plan.strategy), []).append(row.gpu)
        for (count, strategy), names in picks.items():
            on_curve = dict(by_strategy.get(strategy, []))
            y = on_curve.get(count, 0) / GiB
            ax.plot(count, y, marker="*", markersize=13, color=STRATEGY_STYLE[strategy], markeredgecolor="black",
                    linestyle="none")
            ax.annotate(", ".join(names), (count, y), xytext=(6, -12), textcoords="offset points", fontsize=7.5)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.xaxis.set_major_formatter(plain)
        ax.yaxis.set_major_formatter(plain)
        ax.set_xlabel("GPUs (nodes of 8 beyond 8)")
        ax.set_title(method)
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("GiB per GPU (micro-batch 1, checkpointing on, no offload)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    star = plt.Line2D([], [], marker="*", markersize=13, color="white", markeredgecolor="black", linestyle="none")
    fig.legend(handles + [star], labels + ["fewest GPUs that fit (the table's rows)"], loc="lower center",
               ncol=len(labels) + 1, fontsize=9, frameon=False, bbox_to_anchor=(0.5, -0.06))
    fig.suptitle(title)
    fig.tight_layout()
    picks = "; ".join(f"{r.gpu} {r.method}: {r.gpus} GPUs {r.plan.strategy}" for r in rows if r.plan is not None)
    return _save(fig, path, f"fewest GPUs that fit: {picks}")


def _save(fig, path: str | Path, description: str) -> Path:
    """Written beside the target and renamed over it: a failed write leaves no half a PNG. The description (the
    chosen plan) goes into the PNG's text chunk, for tools and tests that read the file rather than look at it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight", metadata={"Description": description})
        os.replace(tmp, path)
    except OSError as err:  # e.g. a directory that takes no new files (/proc), a full disk
        raise LaunchError(f"cannot write {path} ({err.strerror or err}); choose another path.") from None
    finally:
        plt.close(fig)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path
