"""The CLI flags that are shorthands for config keys, in one table shared by `run`, `submit` and `lr-find`."""

from __future__ import annotations

import argparse

# flag attribute -> (config key, the value written for a flag that is set)
FLAG_KEYS = {
    "max_steps": ("training.max_steps", None),
    "save_steps": ("training.save_steps", None),
    "strategy": ("parallel.strategy", None),
    "nproc_per_node": ("parallel.nproc_per_node", None),
    "resume_from": ("training.resume_from_checkpoint", None),
    "overwrite": ("training.overwrite_output_dir", True),
    "no_resume": ("training.ignore_checkpoints", True),
}


def flag_overrides(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(flag as typed, `key=value` override) for the flags a command has and the user set; they win over the
    YAML and over positional overrides (launcher.config.load_train_config applies them last, and says so)."""
    out = []
    for attr, (key, constant) in FLAG_KEYS.items():
        value = getattr(args, attr, None)
        if value is not None and value is not False:
            flag = "--" + attr.replace("_", "-") + ("" if constant is not None else f" {value}")
            out.append((flag, f"{key}={value if constant is None else constant}"))
    return out
