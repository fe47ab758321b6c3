"""Byte sizes as users write them ("80GiB", "40GB", "512MiB") and as tables print them."""

from __future__ import annotations

import re

from launcher.errors import LaunchError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3, "ti": 1024**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int, what: str = "size") -> int:
    """'80GiB' -> 85899345920; '80GB' is decimal (GPU vendors quote GB); a bare number is bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise LaunchError(f"{what} must be positive, not {text}.")
        return text
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise LaunchError(f"{what} {text!r} is not a size; write it like 80GiB, 40GB or 24576MiB.")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise LaunchError(f"{what} must be positive, not {text!r}.")
    return value


def format_bytes(n: float) -> str:
    """Binary units, three significant figures: what nvidia-smi users read."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"
