"""FSDP2: `fully_shard` on each decoder layer, then the root; parameters gathered in the compute dtype.

The MixedPrecisionPolicy casts parameters to bf16/fp16 for compute and reduces gradients in fp32, while
the sharded master weights and optimizer state stay fp32; hence no autocast on top.

Only rank 0 builds the full model; the other ranks build it on the meta device (engines.model_construction
yields `empty` to modeling.build_model), shard it, allocate their shards, and receive them from rank 0 in one broadcast. A node therefore
holds one full fp32 copy of the model in host memory, not one per rank.
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
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        empty = any(p.is_meta for p in model.parameters())
        full_state = {} if empty else model.state_dict()  # rank 0's weights (on CPU), kept until broadcast
        buffers = {name: buf.to(device) for name, buf in model.named_buffers()} if empty else {}
        # fully_shard moves each unit's parameters to the mesh's device as it shards them: the whole model
        # is never on one GPU at once.
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        compute = AUTOCAST_DTYPES.get(plan.precision)
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        if empty:
            model.to_empty(device=device)
            with torch.no_grad():
                for name, buf in model.named_buffers():  # non-persistent ones (RoPE) are not broadcast
                    buf.copy_(buffers[name])
        set_model_state_dict(model, full_state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        return model

    def make_grad_scaler(self):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(self.device.type)

    def accumulating(self, final: bool):
        self.wrapped.set_requires_gradient_sync(final)
        return contextlib.nullcontext()
