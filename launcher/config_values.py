"""Checks of a train config's values, each ending in one sentence: types against the dataclass annotations,
numbers against their intervals, names against their choices, unknown keys with the closest known one."""

from __future__ import annotations

import difflib
import math
import types
import typing
from typing import Any, Union

from launcher.env import DIST_TIMEOUT_RANGE
from launcher.errors import LaunchError

# Every float a config can hold and the interval it must lie in (nan and inf never do); "[0, 1)" style.
# A learning rate of 0 is legitimate: the loop then runs forward and backward without moving a weight.
_RANGES = (
    ("training.learning_rate", "[0, inf)"), ("training.weight_decay", "[0, inf)"),
    ("training.adam_beta1", "[0, 1)"), ("training.adam_beta2", "[0, 1)"), ("training.adam_epsilon", "(0, inf)"),
    ("training.warmup_ratio", "[0, 1]"), ("training.max_grad_norm", "[0, inf)"),
    ("training.max_grad_value", "[0, inf)"), ("training.num_train_epochs", "(0, inf)"),
    ("training.early_stopping_threshold", "[0, inf)"), ("finetune.lora_dropout", "[0, 1)"),
    ("training.save_overhead_cap", "(0, 1)"),
    ("training.loss_chunk_tokens", "[0, inf)"),
)
_COUNTS = ("training.logging_steps", "training.save_steps", "training.eval_steps", "training.save_total_limit",
           "training.per_device_train_batch_size", "training.gradient_accumulation_steps",
           "training.global_batch_size", "training.per_device_eval_batch_size", "training.early_stopping_patience",
           "data.max_train_bytes", "data.max_eval_samples", "data.vocab_size", "parallel.nproc_per_node",
           "finetune.lora_alpha")
_SEED_MAX = 2**32 - 1  # NumPy's seeds are 32-bit


def check_numbers(config) -> None:
    """Every numeric key in its range, so nan, inf, 0 or a negative value stops here, not inside a rank."""
    def get(key):
        section, name = key.split(".")
        return getattr(getattr(config, section), name)

    for key, interval in _RANGES:
        value = get(key)
        low, high = (float(end) for end in interval[1:-1].split(", "))
        inside = (low <= value if interval[0] == "[" else low < value) and \
                 (value <= high if interval[-1] == "]" else value < high)
        if not (math.isfinite(value) and inside):
            raise LaunchError(f"{key} must be a finite number in {interval}, not {value!r}.")
    for key in _COUNTS:
        value = get(key)
        if value is not None and value < 1:
            raise LaunchError(f"{key} must be at least 1, not {value!r}.")
    t = config.training
    if t.max_steps == 0 or t.max_steps < -1:
        raise LaunchError(f"training.max_steps must be at least 1 (or -1 to train for num_train_epochs), "
                          f"not {t.max_steps}.")
    if t.warmup_steps < 0:
        raise LaunchError(f"training.warmup_steps must be >= 0, not {t.warmup_steps}.")
    for key, seed in (("training.seed", t.seed), ("training.data_seed", t.data_seed)):
        if seed is not None and not 0 <= seed <= _SEED_MAX:
            raise LaunchError(f"{key} must be in [0, {_SEED_MAX}], not {seed}.")
    timeout, (low, high) = config.supervision.dist_timeout_s, DIST_TIMEOUT_RANGE
    if timeout is not None and not low <= timeout <= high:
        raise LaunchError(f"supervision.dist_timeout_s must be from {low} to {high:,.0f} seconds, not {timeout}.")
    if config.data.block_size is not None and config.data.block_size < 2:
        raise LaunchError(f"data.block_size must be at least 2 (a token and the next one), not {config.data.block_size}.")


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise LaunchError(f"{key} {value!r} is not one of {', '.join(choices)}.")


def reject_unknown(data: dict, known: Any, where: str) -> None:
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}."
            raise LaunchError(f"{where}: unknown key '{key}'{hint}")


def check_type(value: Any, hint: Any, key: str, source: str) -> Any:
    """Accept a value if it fits the annotation (ints widen to floats); otherwise one clear sentence."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_type(value, arg, key, source)
            except LaunchError:
                continue
        raise LaunchError(f"{source}: {key} must be {_describe(hint)}, not {value!r}.")
    if origin is list:
        (item_type,) = typing.get_args(hint) or (Any,)
        if isinstance(value, str):  # a single path/name is a one-item list
            value = [value]
        if not isinstance(value, list):
            raise LaunchError(f"{source}: {key} must be a list, not {value!r}.")
        return [check_type(v, item_type, key, source) for v in value]
    if hint is dict:
        if not isinstance(value, dict):
            raise LaunchError(f"{source}: {key} must be a mapping, not {value!r}.")
        return value
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string; users mean the number
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    raise LaunchError(f"{source}: {key} must be {_describe(hint)}, not {value!r}.")


def _describe(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        return " or ".join(_describe(a) for a in args)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    return names.get(hint, "a list" if typing.get_origin(hint) is list else str(hint))
