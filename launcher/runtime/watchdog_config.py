"""The watchdog's settings, WatchdogConfig, and the one rule for their values.

Three places may set them, key by key: LLAUNCH_WATCHDOG (launcher.env.WATCHDOG: comma-separated key=number
pairs, or "off"), the train config's `supervision.watchdog` and the cluster profile's `watchdog` (mappings of
the same keys, `enabled: false` to turn it off); the variable wins, then the config, then the profile, then the
default (launcher.env says why). Checked here, once, before any rank starts."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from launcher.env import WATCHDOG
from launcher.errors import LaunchError

LARGEST = 1e9


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
    def resolve(cls, env=None, config: dict | None = None, profile: dict | None = None) -> "WatchdogConfig":
        """The settings for one launch: LLAUNCH_WATCHDOG over the config's over the profile's, key by key."""
        return cls(**{**check_settings(profile or {}, "cluster profile: watchdog"),
                      **check_settings(config or {}, "supervision.watchdog"), **_from_variable(env)})


def check_settings(values: dict, where: str) -> dict:
    """A mapping of WatchdogConfig keys, checked: `where.key must be ...` in one sentence."""
    names = {f.name: f.type for f in dataclasses.fields(WatchdogConfig)}
    for key, value in values.items():
        if key not in names:
            raise LaunchError(f"{where} has unknown key {key!r}; use {', '.join(names)}.")
        if key == "enabled":
            if not isinstance(value, bool):
                raise LaunchError(f"{where}.enabled must be true or false, not {value!r}.")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not _positive(value) or \
                (names[key] == "int" and value != int(value)):
            raise LaunchError(f"{where}.{key} must be a positive {'integer' if names[key] == 'int' else 'number'} "
                              f"up to {LARGEST:g}, not {value!r}.")
    return {key: int(v) if names[key] == "int" else v for key, v in values.items()}


def _positive(value: float) -> bool:
    """0 kills a healthy run as hung (poll_s=0 busy-loops); nan or inf never sees a hang."""
    return math.isfinite(value) and 0 < value <= LARGEST


def _from_variable(env) -> dict:
    text = WATCHDOG.get(env)
    if text.lower() == "off":
        return {"enabled": False}
    values = {}
    names = {f.name: f.type for f in dataclasses.fields(WatchdogConfig) if f.name != "enabled"}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = pair.partition("=")
        try:
            values[key] = int(value) if names[key] == "int" else float(value)
        except (KeyError, ValueError):
            raise LaunchError(f"{WATCHDOG.name} entry {pair!r} is not key=number with key one of "
                              f"{', '.join(names)} (or set it to off).") from None
        if not _positive(values[key]):
            raise LaunchError(f"{WATCHDOG.name} entry {pair!r} must be a positive number up to 1e9 (or set "
                              f"{WATCHDOG.name}=off).")
    return values
