"""Preemption: a signal only sets a flag; at the next step boundary every rank agrees to save and stop.

Saving inside a signal handler would run collectives at an arbitrary point of the step and leave the
other ranks waiting forever; so the handler records the request and `should_stop()` turns it into one
decision shared by all ranks (one all-reduce), taken where the loop is between optimizer steps.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import torch
import torch.distributed as dist

from launcher.errors import LaunchError

# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry". A rank, torchrun's wrapper
# and `llaunch run` exit with it after a preemption checkpoint; SLURM requeue logic keys on it.
REQUEUE_EXIT_CODE = 75
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")
# SLURM signals every process of a job and torchrun re-sends SIGTERM to its workers, so one preemption
# reaches a rank two or three times within milliseconds; only a signal after this window means "now".
DUPLICATE_WINDOW_S = 1.0


def parse_signals(names) -> tuple[signal.Signals, ...]:
    parsed = []
    for name in names:
        key = str(name).upper()
        key = key if key.startswith("SIG") else "SIG" + key
        if not hasattr(signal.Signals, key):
            raise LaunchError(f"{name!r} is not a signal name; use SIGTERM, SIGUSR1 or SIGUSR2.")
        parsed.append(signal.Signals[key])
    return tuple(parsed)


class PreemptionHandler:
    """Install in each rank before training; poll `should_stop()` once per optimizer step."""

    def __init__(self, signals=DEFAULT_SIGNALS):
        self.signals = parse_signals(signals)
        self.received: signal.Signals | None = None
        self._first_at = 0.0
        self._previous: dict = {}
        self._group = None

    def install(self) -> "PreemptionHandler":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self._first_at = signal.Signals(signum), now
        elif now - self._first_at > DUPLICATE_WINDOW_S:
            # The user (or the scheduler's kill timeout) insists: leave without saving. The previous
            # checkpoint is complete because checkpoints are only published once durable.
            os._exit(128 + signum)

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


def signal_ranks(torchrun_pid: int, signum: int) -> None:
    """In the launcher: deliver a preemption signal to torchrun's workers (the ranks), not to torchrun.

    torchrun dies on SIGUSR1/SIGUSR2 (it handles only SIGINT/SIGTERM/SIGHUP/SIGQUIT), which would orphan the
    ranks; sent to the ranks, the signal makes them save and exit, and torchrun then ends on its own.
    """
    import psutil

    try:
        ranks = psutil.Process(torchrun_pid).children()
    except psutil.NoSuchProcess:
        return
    for rank in ranks:
        with contextlib.suppress(psutil.NoSuchProcess):
            rank.send_signal(signum)
