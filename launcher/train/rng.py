"""Capture and restore every random stream a rank draws from, so a resumed run draws the same numbers.

Dropout masks, data shuffles done outside the sampler and any user code consult Python's `random`,
NumPy's global generator and torch's CPU and CUDA generators; all four are saved per rank, as tensors and
plain Python values only, so a checkpoint's rank state loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": _plain_numpy_state(np.random.get_state()),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state.get("torch_cuda")
    if cuda_states is not None and torch.cuda.is_available():
        # A resharded resume may see fewer visible devices than the saving rank did.
        for device, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def _plain_numpy_state(state: tuple) -> tuple:
    """NumPy's legacy MT19937 state with its key array as a list of ints and its numbers as Python numbers."""
    name, keys, position, has_gauss, cached_gaussian = state
    return name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)
