"""What a run reports: tokens/s, MFU and peak memory, to metrics.jsonl, tensorboard and the console."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from launcher.jobdir.layout import JobDir


class Throughput:
    """Tokens/s and MFU over the window since the last report (no host sync except at reports)."""

    def __init__(self, flops_per_token: float, peak_flops_total: float | None):
        self.flops_per_token = flops_per_token
        self.peak_flops_total = peak_flops_total
        self._start = time.perf_counter()
        self._tokens = 0

    def restart(self) -> None:
        self._start, self._tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def report(self) -> dict:
        now = time.perf_counter()
        elapsed = max(now - self._start, 1e-9)
        tokens_per_s = self._tokens / elapsed
        out = {"tokens_per_s": tokens_per_s}
        if self.peak_flops_total:
            out["mfu"] = tokens_per_s * self.flops_per_token / self.peak_flops_total
        self._start, self._tokens = now, 0
        return out


# A step's losses travel as one device tensor (one all-reduce, no host sync per step): the mean token loss and
# the MoE router's aux loss (zero for a dense model), at these indices.
LOSS, AUX_LOSS = 0, 1


def step_losses(device: torch.device) -> torch.Tensor:
    """A zero [loss, aux loss] tensor (LOSS, AUX_LOSS) to add a step's micro-batches into."""
    return torch.zeros(2, device=device)


class LossWindow:
    """This rank's training loss and MoE router aux loss (zero for a dense model) summed over the steps since the
    last report, kept on the device (no host sync per step). A checkpoint carries it in the rank's state, so a
    run resumed in mid-window logs the losses the uninterrupted run logs: at the same world size each rank takes
    back its own sums; at another, where the samples are spread over the ranks differently, every rank takes the
    ranks' mean sum, which is what the logged loss averages over them (Trainer._log_train)."""

    def __init__(self, device: torch.device):
        self.sum, self.steps = step_losses(device), 0

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss
        self.steps += 1

    def take(self) -> torch.Tensor:
        """The window's mean, and a new window."""
        mean = self.sum / self.steps
        self.sum, self.steps = torch.zeros_like(self.sum), 0
        return mean

    def state_dict(self, world: int) -> dict:
        """A collective when distributed (every rank saves a checkpoint at the same step): the mean over ranks."""
        mean_sum = self.sum.detach().clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(mean_sum)
        return {"sum": self.sum.detach().cpu(), "steps": self.steps, "mean_sum": (mean_sum / world).cpu(),
                "world": world}

    def load_state_dict(self, state: dict, world: int) -> None:
        """`world`: the resumed run's; a window saved at another one by an older llaunch (no mean) restarts."""
        key = "sum" if state["world"] == world else "mean_sum"
        if key not in state:
            return
        saved = state[key].reshape(-1).to(self.sum.device)  # an older llaunch saved the loss alone
        self.sum, self.steps = torch.zeros_like(self.sum), int(state["steps"])
        self.sum[:saved.numel()] = saved


def memory_stats(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


class MetricsWriter:
    """Rank 0's sinks: one JSON object per logged step in metrics.jsonl, tensorboard scalars, a progress bar."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int, report_to: list[str]):
        self.path = JobDir(output_dir).metrics
        self._file = self.path.open("a")
        self._tb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(JobDir(output_dir).tensorboard))
        self._progress = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                TextColumn("ETA"), TimeRemainingColumn(),
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, stats="")
            self._progress.start()

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key if "/" in key else f"train/{key}", value, step)
        line = _format(record)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=line)
        else:
            print(f"step {step}: {line}", flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        self._file.close()


def _format(record: dict) -> str:
    parts = []
    for key, fmt in (("loss", "{:.4f}"), ("aux_loss", "{:.4f}"), ("eval_loss", "{:.4f}"), ("eval_perplexity", "{:.2f}"),
                     ("lr", "{:.2e}"), ("grad_norm", "{:.3f}"), ("tokens_per_s", "{:,.0f}"), ("mfu", "{:.1%}")):
        if key in record and record[key] is not None:
            parts.append(f"{key} " + fmt.format(record[key]))
    return "  ".join(parts)


def peak_flops(plan, device: torch.device, world_size: int) -> float | None:
    """Dense peak of all GPUs together in the compute precision, from launcher/planning/data/gpus.json; None on CPU."""
    if device.type != "cuda":
        return None
    from launcher.planning.hardware import gpu_facts

    facts = gpu_facts(plan.gpu_name or torch.cuda.get_device_name(device))
    if facts is None:
        return None
    return facts.peak_flops[plan.flops_key] * world_size
