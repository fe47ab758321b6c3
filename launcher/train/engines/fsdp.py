"""FSDP2: `fully_shard` on each decoder layer, then the root; parameters gathered in the compute dtype.

The MixedPrecisionPolicy casts parameters to bf16/fp16 for compute and reduces gradients in fp32, while
the sharded master weights and optimizer state stay fp32; hence no autocast on top.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from launcher.plan import Plan
from launcher.train.engines.base import AUTOCAST_DTYPES, TorchEngine
from launcher.train.modeling import decoder_layers


class FSDPEngine(TorchEngine):
    uses_autocast = False

    def wrap(self, model: nn.Module, plan: Plan, device: torch.device) -> nn.Module:
        model.to(device)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        compute = AUTOCAST_DTYPES.get(plan.precision)
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model

    def make_grad_scaler(self):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(self.device.type)

    def accumulating(self, final: bool):
        self.wrapped.set_requires_gradient_sync(final)
        return contextlib.nullcontext()
