"""`llaunch submit CONFIG --sweep section.key=V1,V2,... [--sweep ...]`: a grid over the train config's overrides.

Each element is a job of its own, loaded, checked and planned by launcher.jobdir.prepare exactly as a single
`submit` is (a sweep over the model gets a plan per model), into its own job dir under one sweep dir
(launcher.jobdir.sweep_dir). Whatever a user can get wrong is refused here in one sentence before any element is
planned or anything is written: a key the config does not have, an empty value, a value its key's rule refuses
(every element's config is validated first), a key also set by a flag or an override, and elements that would
share a job dir or train the very same config. The SLURM side (one job array) is cluster.sweep's.
"""

from __future__ import annotations

import difflib
import itertools
import re
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from launcher.config import TrainConfig, load_train_config
from launcher.errors import LaunchError
from launcher.jobdir.prepare import Job, is_run_dir, prepare_job
from launcher.jobdir.sweep_dir import SweepDir, SweepElement

SWEEP_OWNS = ("training.output_dir",)  # the sweep chooses it: each element's job dir
VALUE_NAME_MAX = 40  # characters of one value in an element's name (its job dir's), after sanitizing
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass(frozen=True)
class SweepAxis:
    """One `--sweep`: a config key and its values as typed (YAML text, parsed as an override's are)."""

    key: str
    values: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.key.partition(".")[2]


@dataclass
class Sweep:
    """The planned elements of a sweep, in array-task order, each with its job (config, plan, job dir)."""

    dir: SweepDir
    elements: list[SweepElement]
    jobs: list[Job]


def config_keys() -> list[str]:
    """Every `section.key` of the train config."""
    hints = typing.get_type_hints(TrainConfig)
    return [f"{section.name}.{key.name}" for section in fields(TrainConfig) for key in fields(hints[section.name])]


def split_values(text: str) -> list[str]:
    """`1e-4,3e-4` -> ['1e-4', '3e-4']; a comma inside [...], {...} or quotes belongs to its value."""
    values, current, depth, quote = [], [], 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    return values + ["".join(current).strip()]


def parse_axis(spec: str) -> SweepAxis:
    key, sep, raw = spec.partition("=")
    key = key.strip()
    if not sep:
        raise LaunchError(f"--sweep {spec!r} must look like section.key=V1,V2,..., e.g. "
                          f"training.learning_rate=1e-4,3e-4.")
    if key not in config_keys():
        close = difflib.get_close_matches(key, config_keys(), n=1)
        hint = f"did you mean {close[0]}?" if close else "sweep a section.key of the train config (see examples/)."
        raise LaunchError(f"--sweep key {key!r} is not a key of the train config; {hint}")
    if key in SWEEP_OWNS:
        raise LaunchError(f"--sweep cannot vary {key}: the sweep puts each element in its own directory under "
                          f"--output-dir; sweep another key.")
    values = split_values(raw)
    if not all(values):
        raise LaunchError(f"--sweep {spec!r} has an empty value; give the values separated by commas, e.g. "
                          f"{key}=1,2.")
    repeated = next((v for v in values if values.count(v) > 1), None)
    if repeated is not None:
        raise LaunchError(f"--sweep {key} lists {repeated} twice; give each value once.")
    return SweepAxis(key, tuple(values))


def parse_axes(specs: list[str], overrides: list[str] | tuple[str, ...],
               flags: list[tuple[str, str]] | tuple) -> list[SweepAxis]:
    """The --sweep flags, each key swept once and set nowhere else (a flag or an override would make the
    elements' values moot)."""
    axes = [parse_axis(spec) for spec in specs]
    keys = [axis.key for axis in axes]
    twice = next((key for key in keys if keys.count(key) > 1), None)
    if twice is not None:
        raise LaunchError(f"--sweep {twice} is given twice; list all of its values in one --sweep.")
    for flag, item in flags:
        if item.partition("=")[0] in keys:
            raise LaunchError(f"{flag} sets {item.partition('=')[0]}, which --sweep varies; drop one of them.")
    for item in overrides:
        if item.partition("=")[0].strip() in keys:
            raise LaunchError(f"the override {item} sets a key --sweep varies; drop one of them.")
    return axes


def grid(axes: list[SweepAxis]) -> list[SweepElement]:
    """Every combination of the axes' values, the last axis varying fastest; each named by its values (a key by
    its name in its section: no two sections share one)."""
    elements = []
    for values in itertools.product(*(axis.values for axis in axes)):
        name = "_".join(f"{axis.name}={_value_text(value)}" for axis, value in zip(axes, values))
        elements.append(SweepElement(name, tuple(f"{axis.key}={value}" for axis, value in zip(axes, values))))
    return elements


def _value_text(value: str) -> str:
    """A value as a file name's part: letters, digits and ._+- only; a long one (a path) keeps its end."""
    return _UNSAFE.sub("-", value)[-VALUE_NAME_MAX:]


def prepare_sweep(config_path: str | Path, overrides: list[str] | tuple[str, ...], specs: list[str], *,
                  flags: list[tuple[str, str]] | tuple = (), knobs: dict | None = None,
                  output_dir: str | Path | None = None, hardware=None) -> Sweep:
    """Check every element, then plan each into its job dir under the sweep dir (nothing is written)."""
    axes = parse_axes(specs, overrides, flags)
    elements = grid(axes)
    if len(elements) < 2:
        raise LaunchError(f"--sweep {axes[0].key} has one value, which is no sweep; pass it as an override "
                          f"({elements[0].label}) or give more values.")
    base = load_train_config(config_path, overrides, flags)
    root = sweep_root(output_dir or base.training.output_dir)
    configs = [for_element(element, load_train_config, config_path, [*overrides, *element.overrides], flags)
               for element in elements]
    _check_distinct(elements, configs)
    jobs = [for_element(element, prepare_job, config_path, [*overrides, *element.overrides], flags=flags,
                        knobs=dict(knobs or {}), output_dir=root.element(element.name), hardware=hardware, write=False)
            for element in elements]
    return Sweep(root, elements, jobs)


def for_element(element: SweepElement, make, *args, **kwargs):
    """`make(*args, **kwargs)`, its one-sentence error naming the element it is about."""
    try:
        return make(*args, **kwargs)
    except LaunchError as err:
        raise LaunchError(f"sweep element {element.name} ({element.label}): {err}") from None


def _check_distinct(elements: list[SweepElement], configs: list[TrainConfig]) -> None:
    """Two elements may neither share a job dir nor train the same config (1e-4 and 0.0001 are one value)."""
    seen: dict[str, SweepElement] = {}
    for element, config in zip(elements, configs):
        if element.name in seen:
            raise LaunchError(f"sweep elements {seen[element.name].label} and {element.label} would share the job "
                              f"dir {element.name}; give values that differ in letters or digits.")
        seen[element.name] = element
    for (a, first), (b, second) in itertools.combinations(zip(elements, configs), 2):
        if first.to_dict() == second.to_dict():
            raise LaunchError(f"sweep elements {a.label} and {b.label} are the same config; give each value once.")


def sweep_root(output_dir: str | Path | None) -> SweepDir:
    """The sweep dir: new, empty, or an earlier sweep's (its elements resume from their checkpoints); never a
    single run's directory nor one holding anything else, which a sweep neither writes into nor removes."""
    if not output_dir:
        raise LaunchError("no output directory for the sweep; pass --output-dir DIR or set training.output_dir.")
    root = Path(output_dir).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise LaunchError(f"sweep directory {root} is a file; choose another --output-dir.")
    under = next((p for p in root.parents if p.exists()), None)
    if under is not None and not under.is_dir():
        raise LaunchError(f"sweep directory {root} is under the file {under}; choose another --output-dir.")
    if is_run_dir(root):
        raise LaunchError(f"{root} holds a single run, not a sweep; choose a new --output-dir for the sweep.")
    sweep_dir = SweepDir(root)
    if root.is_dir() and any(root.iterdir()) and not sweep_dir.is_sweep:
        raise LaunchError(f"{root} already holds files and is not a llaunch sweep directory (no "
                          f"{sweep_dir.record.name}), so llaunch will not write into it; choose a new or empty "
                          f"--output-dir.")
    return sweep_dir
