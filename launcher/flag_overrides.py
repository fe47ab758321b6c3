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


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """`key=value` overrides for the flags a command has and the user set; they win over the YAML and over
    positional overrides, so they go last."""
    out = []
    for attr, (key, constant) in FLAG_KEYS.items():
        value = getattr(args, attr, None)
        if value is not None and value is not False:
            out.append(f"{key}={value if constant is None else constant}")
    return out
