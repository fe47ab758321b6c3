"""Fault injection for tests and drills, off unless LLAUNCH_FAULT is set (docs/faults.md).

LLAUNCH_FAULT holds one or more faults separated by ';', each `kind:key=value,...`:

    hang:rank=1,step=4,how=sleep    rank 1 stops making progress as step 4 begins; how = sleep (forever,
                                    in time.sleep), sigstop (the process stops itself) or spin (a Python
                                    loop that never yields the GIL to another thread)
    slow:rank=1,ms=150              rank 1's forward/backward takes 150 ms longer in every step (like a
                                    slower GPU: the time passes before the gradient reduction)
    crash:rank=1,step=4             rank 1 exits with code 1 as step 4 begins (os._exit: no cleanup)

`rank` is the global rank; `step` counts optimizer steps from 1. Any fault may add `node=NAME`: it strikes only
where the rank runs on that node (SLURM's name, launcher.runtime.node.node_name), as a bad node's would; the
rank that takes its place elsewhere after a restart on a spare runs clean. The functions named injected_* show
up in a stack dump, so a test can tell the injected frame from a real one.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

from launcher.env import FAULT
from launcher.errors import LaunchError
from launcher.runtime.node import node_name

KINDS = {"hang": ("rank", "step"), "slow": ("rank", "ms"), "crash": ("rank", "step")}
HANG_HOW = ("sleep", "sigstop", "spin")
MAX_SLOW_MS = 3_600_000.0  # an hour per step: beyond it time.sleep overflows long before a drill needs it


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int = 0
    ms: float = 0.0
    how: str = "sleep"
    node: str | None = None  # only on this node (None: on any)


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        kind, _, params = item.partition(":")
        pairs = [pair.partition("=") for pair in params.split(",") if pair]
        values = {key.strip(): value.strip() for key, sep, value in pairs if sep}
        allowed = {*KINDS.get(kind, ()), "node", *(("how",) if kind == "hang" else ())}
        try:
            if kind not in KINDS or len(values) != len(pairs) or set(values) - allowed or set(KINDS[kind]) - set(values):
                raise ValueError
            fault = Fault(kind, int(values["rank"]), int(values.get("step", 0)), float(values.get("ms", 0)),
                          values.get("how", "sleep"), values.get("node") or None)
            if fault.how not in HANG_HOW or fault.rank < 0 or ("step" in values and fault.step < 1) \
                    or not 0 <= fault.ms <= MAX_SLOW_MS:  # nan compares false
                raise ValueError
        except ValueError:
            raise LaunchError(f"{FAULT.name} fault {item!r} is not one of hang:rank=R,step=S[,how=sleep|sigstop|spin], "
                              f"slow:rank=R,ms=M, crash:rank=R,step=S (each with an optional ,node=NAME) with R >= 0, S >= 1 and M from 0 to "
                              f"{MAX_SLOW_MS:.0f} milliseconds; see docs/faults.md.") from None
        faults.append(fault)
    return faults


def faults_from_env() -> list[Fault]:
    """The faults LLAUNCH_FAULT asks for; `llaunch run` calls it too, so a typo stops before anything starts."""
    return parse_faults(FAULT.get())


class FaultInjector:
    """The faults of one rank, applied as each step begins."""

    def __init__(self, faults: list[Fault], rank: int):
        here = node_name()
        self.faults = [f for f in faults if f.rank == rank and f.node in (None, here)]
        self.slow_s = sum(f.ms for f in self.faults if f.kind == "slow") / 1000.0

    @classmethod
    def from_env(cls, rank: int) -> "FaultInjector | None":
        injector = cls(faults_from_env(), rank)
        return injector if injector.faults else None

    def step_begins(self, step: int) -> None:
        for fault in self.faults:
            if fault.kind == "hang" and fault.step == step:
                injected_hang(fault.how)
            elif fault.kind == "crash" and fault.step == step:
                injected_crash(step)

    def before_sync(self) -> None:
        if self.slow_s:
            time.sleep(self.slow_s)


def injected_hang(how: str) -> None:
    print(f"[llaunch] fault injection: hang ({how})", file=sys.stderr, flush=True)
    if how == "spin":
        sys.setswitchinterval(1e6)  # no other Python thread of the rank runs again
        while True:
            pass
    if how == "sigstop":
        os.kill(os.getpid(), signal.SIGSTOP)  # and after a SIGCONT, sleeps like the others
    while True:
        time.sleep(3600)


def injected_crash(step: int) -> None:
    print(f"[llaunch] fault injection: crash at step {step}", file=sys.stderr, flush=True)
    os._exit(1)
