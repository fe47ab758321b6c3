"""The watchdog's settings: LLAUNCH_WATCHDOG, comma-separated key=value pairs of WatchdogConfig ("off" disables
it), e.g. LLAUNCH_WATCHDOG=floor_s=30,first_step_s=300; read and checked here, once, before any rank starts."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from launcher.errors import LaunchError

WATCHDOG_ENV = "LLAUNCH_WATCHDOG"


@dataclass
class WatchdogConfig:
    poll_s: float = 1.0
    k: float = 10.0  # timeout = k x the rolling p99 of the phase's durations ...
    floor_s: float = 120.0  # ... but never less than this
    first_step_s: float = 900.0  # start-up, the first step (compilation, warm-up), a phase not seen to end yet
    checkpoint_s: float = 1800.0  # checkpoint save / load
    window: int = 500  # phase durations kept per phase for the p99
    grace_s: float = 10.0  # how long the stack dumps may take before the ranks are killed
    enabled: bool = True

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "WatchdogConfig":
        text = (os.environ if env is None else env).get(WATCHDOG_ENV, "").strip()
        if text.lower() == "off":
            return cls(enabled=False)
        values = {}
        names = {f.name: f.type for f in dataclasses.fields(cls) if f.name != "enabled"}
        for pair in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = pair.partition("=")
            try:
                values[key] = int(value) if names[key] == "int" else float(value)
            except (KeyError, ValueError):
                raise LaunchError(f"{WATCHDOG_ENV} entry {pair!r} is not key=number with key one of "
                                  f"{', '.join(names)} (or set it to off).") from None
            if not 0 < values[key] <= 1e9:  # nan too: 0 kills a healthy run as hung, nan never sees a hang
                raise LaunchError(f"{WATCHDOG_ENV} entry {pair!r} must be a positive number up to 1e9 (or set "
                                  f"{WATCHDOG_ENV}=off).")
        return cls(**values)
