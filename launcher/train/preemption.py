"""Preemption: a signal only sets a flag; at the next step boundary every rank agrees to save and stop.

Saving inside a signal handler would run collectives at an arbitrary point of the step and leave the
other ranks waiting forever; so the handler records the request (launcher.runtime.signals) and `should_stop()`
turns it into one decision shared by all ranks (one all-reduce), taken where the loop is between
optimizer steps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from launcher.runtime.signals import DEFAULT_SIGNALS, StopSignals

from launcher.errors import REQUEUE_EXIT_CODE


class PreemptionHandler(StopSignals):
    """Install in each rank before training; poll `should_stop()` once per optimizer step."""

    def __init__(self, signals=DEFAULT_SIGNALS):
        super().__init__(signals)
        self._group = None

    def should_stop(self) -> bool:
        """True on every rank when any rank was signalled; a collective, so call it on all ranks.

        The vote goes over a CPU (gloo) group: on NCCL a GPU tensor and `.item()` would make the host wait
        for the GPU at every step boundary.
        """
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)
        if dist.is_available() and dist.is_initialized():
            if self._group is None:
                self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def stop_sentence(self, step: int) -> str:
        """What rank 0 prints after the stop checkpoint. SIGUSR1/2 are the time-limit and preemption warnings
        (SLURM's --signal), after which the job requeues; SIGTERM is also what `scancel` sends, so its words
        promise no requeue."""
        name = self.received.name if self.received is not None else "another rank"
        if name in ("SIGUSR1", "SIGUSR2"):
            return f"preempted ({name}): saved step {step}, exiting with {REQUEUE_EXIT_CODE} to be requeued"
        return (f"stopped by {name}: saved step {step}, exiting with {REQUEUE_EXIT_CODE} (a preempted job is "
                f"requeued and resumes there, a cancelled one ends)")
