"""Learning-rate range test (Smith 2015, as popularised by fastai): raise the LR exponentially each step,
record an exponentially smoothed loss, stop once it diverges, and suggest the LR where it fell fastest.

The sweep drives the real training step (same model, data, engine, accumulation) through an LR schedule,
so the suggestion holds for the run that follows; it trains a throw-away copy in a temporary job dir.
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import torch

from launcher.errors import LaunchError


@dataclass
class LRFindResult:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # raw
    smoothed: list[float] = field(default_factory=list)  # bias-corrected exponential moving average
    suggested_lr: float | None = None
    stopped_early: bool = False


def sweep_lrs(start_lr: float, end_lr: float, num_steps: int) -> list[float]:
    """start_lr * (end_lr / start_lr) ** (i / (num_steps - 1)): even spacing on a log axis."""
    if not (0 < start_lr < end_lr and math.isfinite(end_lr)):
        raise LaunchError(f"lr-find needs 0 < start_lr < end_lr, not {start_lr} and {end_lr}.")
    if num_steps < 10:
        raise LaunchError("lr-find needs at least 10 steps to see a trend.")
    return [start_lr * (end_lr / start_lr) ** (i / (num_steps - 1)) for i in range(num_steps)]


def smooth(losses: list[float], beta: float) -> list[float]:
    """EMA with bias correction, so the first values are not dragged toward zero."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** i))
    return out


def suggest_lr(lrs: list[float], smoothed: list[float], skip_start: int = 5, skip_end: int = 3) -> float | None:
    """The LR of the steepest descent of the smoothed loss against log(lr), ignoring the noisy ends."""
    lo, hi = skip_start, len(smoothed) - skip_end
    if hi - lo < 3:
        return None
    slopes = [(smoothed[i + 1] - smoothed[i - 1]) / (math.log(lrs[i + 1]) - math.log(lrs[i - 1]))
              for i in range(lo, hi - 1)]
    best = min(range(len(slopes)), key=slopes.__getitem__)
    return lrs[lo + best] if slopes[best] < 0 else None


def sweep_scheduler(optimizer: torch.optim.Optimizer, lrs: list[float]):
    """The sweep as an LR schedule: step s trains at lrs[s] (every param group), so the training loop's own
    train_step drives the sweep unchanged."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = lrs[0]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lrs[min(s, len(lrs) - 1)] / lrs[0])


def run_lr_find(train_step: Callable[[], float], lrs: list[float], beta: float = 0.98,
                diverge_factor: float = 4.0) -> LRFindResult:
    """Call `train_step()` (one optimizer update at the scheduled LR, returning its loss) once per LR.

    Stops when the smoothed loss exceeds diverge_factor x its best value, or the loss is not finite."""
    result = LRFindResult()
    best = math.inf
    for lr in lrs:
        loss = float(train_step())
        if not math.isfinite(loss):
            result.stopped_early = True
            break
        result.lrs.append(lr)
        result.losses.append(loss)
        result.smoothed = smooth(result.losses, beta)
        best = min(best, result.smoothed[-1])
        if result.smoothed[-1] > diverge_factor * best:
            result.stopped_early = True
            break
    result.suggested_lr = suggest_lr(result.lrs, result.smoothed)
    return result


def plot(result: LRFindResult, path) -> None:
    """Loss against LR on a log axis, the suggestion marked: the picture a user checks the number against."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from launcher.files import write_files_atomic

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.lrs, result.losses, alpha=0.3, label="loss")
    ax.plot(result.lrs, result.smoothed, label="smoothed loss")
    if result.suggested_lr:
        ax.axvline(result.suggested_lr, color="red", linestyle="--", label=f"suggested {result.suggested_lr:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    write_files_atomic({Path(path): image.getvalue()})
