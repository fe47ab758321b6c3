"""Stop signals, torch-free: the exit code of a preemption checkpoint, which signals mean "save and stop",
the handler that records them, and how the launcher reaches the ranks.

One preemption reaches a rank several times: SLURM signals every process of the job step, the node task
forwards what it gets to the ranks, as `llaunch run` does (launcher.runtime.node). The copies arrive with any delay
(seconds under load), so a rank treats every one of them as the same request: it records the first and
saves at the next step boundary. Stopping without a checkpoint is left to whoever owns the ranks and can
kill them: `llaunch run`'s second signal or its grace period (launcher.runtime.node), SLURM's KillWait SIGKILL.

The handler only assigns an attribute: no import, no I/O, so it is safe at any point of the program,
including while a module is half imported.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

import psutil

from launcher.env import SUPERVISOR_PID
from launcher.errors import LaunchError

# SIGHUP (the terminal closed) and SIGQUIT (Ctrl-\) stop a run like SIGTERM: save, then stop.
DEFAULT_SIGNALS = ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
STOP_SIGNALS = tuple(signal.Signals[name] for name in DEFAULT_SIGNALS)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# A rank registers faulthandler on this one at start: its Python stacks, even while it holds the GIL or sits
# in a C call. A real-time signal no library here uses, and none of the stop signals.
STACK_DUMP_SIGNAL = signal.SIGRTMIN + 4


def parse_signals(names) -> tuple[signal.Signals, ...]:
    parsed = []
    for name in names:
        key = str(name).upper()
        key = key if key.startswith("SIG") else "SIG" + key
        if not hasattr(signal.Signals, key):
            raise LaunchError(f"{name!r} is not a signal name; use some of {', '.join(DEFAULT_SIGNALS)}.")
        parsed.append(signal.Signals[key])
    return tuple(parsed)


class StopSignals:
    """Records the first stop signal received; every later copy is the same request."""

    def __init__(self, signals=DEFAULT_SIGNALS):
        self.signals = parse_signals(signals)
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    def install(self) -> "StopSignals":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def hand_over(self, successor: "StopSignals") -> None:
        """Pass what was recorded to `successor` (installed already) and give back the signals it does not
        take, so a signal that came while the rank was starting is acted on once it can be."""
        if successor.received is None and self.received in successor.signals:
            successor.received = self.received
        for sig in [s for s in self._previous if s not in successor.signals]:
            signal.signal(sig, self._previous.pop(sig))

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)


def ignore_stop_signals() -> None:
    """SIG_IGN for every stop signal: before exec'ing torchrun (SIG_IGN survives exec; the ranks install
    their own handlers), and once a process has decided to stop. Python resets its handlers to SIG_DFL
    while it shuts down, so a late copy of the signal would otherwise kill a process that is exiting
    cleanly (torchrun then reports the rank as killed by that signal)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def die_with_supervisor() -> None:
    """First thing in torchrun's agent and in each rank that launcher.env.SUPERVISOR_PID names a supervisor for: the kernel
    sends this process SIGKILL when its supervisor ends, however it ends (SIGKILL, the OOM killer, a crash),
    so no rank trains on unsupervised beside the rerun that follows. SIGKILL, because a supervisor that is
    gone can neither wait for a save nor stop a hung rank; checkpoints are published by rename, so the rerun
    resumes from the newest complete one. The kernel ties the request to the thread that started us, which is
    the supervisor's main thread (llaunch starts torchrun there, torchrun its workers). A supervisor that died
    before the request was in place has made us someone else's child already: then we end at once.
    Linux only; elsewhere (a laptop's dry run) a no-op."""
    expected = SUPERVISOR_PID.get()
    if not expected.isdigit() or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0 and os.getppid() != int(expected):
        os.kill(os.getpid(), signal.SIGKILL)


def ranks_of(torchrun_pid: int) -> list[psutil.Process]:
    """torchrun's workers (its direct children), [] once torchrun is gone."""
    try:
        return psutil.Process(torchrun_pid).children()
    except psutil.NoSuchProcess:
        return []


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler installed for `signum` (Linux: SigCgt in /proc/PID/status).

    A rank inherits SIG_IGN for the stop signals from torchrun and installs its handler as it starts;
    a signal sent before that is lost, so the node runtime waits for this before forwarding."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def send_signal(pid: int, signum: int) -> None:
    """Signal a process that may already have ended (then there is nothing to do)."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
