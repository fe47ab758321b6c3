"""DDP: every rank holds the whole model; gradients are all-reduced on the final micro-step only."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from launcher.planning.plan import Plan
from launcher.train.engines.base import TorchEngine


class DDPEngine(TorchEngine):
    def wrap(self, model: nn.Module, plan: Plan, device: torch.device) -> nn.Module:
        model.to(device)
        if dist.get_world_size() == 1:
            return model  # nothing to synchronise; skip DDP's bucketing overhead
        # No find_unused_parameters, mixtures of experts included: transformers 5 stores a layer's experts as one
        # [experts, ...] weight that every step uses (an expert no token chose gets a zero slice of its gradient).
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def accumulating(self, final: bool):
        if final or not isinstance(self.wrapped, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.wrapped.no_sync()
