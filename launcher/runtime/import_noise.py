"""Warnings that third-party imports log in every llaunch process and that say nothing about the job.

- torchao (which transformers and PEFT import when it is installed) tries its bundled compiled kernels on import
  and logs "Failed to load <file>" for each this machine cannot load (another Python's build; CUDA kernels on a
  CPU box). llaunch's Float8 training converts linears with torch ops, not with those kernels.
- torch 2.13's pytree logs that registering an Enum as a pytree constant is deprecated, once for each of
  torchao's Enums.

A filter on those two loggers drops these records only; everything else they log still shows.
"""

from __future__ import annotations

import logging

NOISE = {"torchao": "Failed to load ", "torch.utils._pytree": "%s is an Enum subclass"}  # logger: message start


class _DropNoise(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def quiet_import_noise() -> None:
    """Install the filters (before torch or transformers is imported; installing twice adds nothing)."""
    for name, start in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(start))
