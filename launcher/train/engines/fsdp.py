"""FSDP2: `fully_shard` on each decoder layer, then the root; parameters gathered in the compute dtype.

HSDP is the same engine on the plan's 2-D (replicate, shard) mesh: FSDP2 shards over a node's GPUs and
all-reduces the gradient shards across nodes. With tensor parallelism the decoder is first split over the tp
ranks (launcher.train.tensor_parallel), then sharded over the data-parallel ranks, torchtitan's order: each
weight is one DTensor on the (dp_shard, tp) mesh, or (dp_replicate, dp_shard, tp) for HSDP, all slices of the
one world mesh (launcher.train.device_mesh.RankMeshes).

The MixedPrecisionPolicy casts parameters to bf16/fp16 for compute and reduces gradients in fp32, while
the sharded master weights and optimizer state stay fp32; hence no autocast on top.

Only rank 0 builds the full model; the other ranks build it on the meta device (engines.model_construction
yields `empty` to modeling.build_model), shard it, allocate their shards, and receive them from rank 0 in one broadcast. A node therefore
holds one full fp32 copy of the model in host memory, not one per rank.

With expert parallelism (launcher/train/expert_parallel.py) each MoE layer's experts, split over the ep ranks,
are an FSDP unit of their own on the ranks outside ep (RankMeshes.experts_dp). EXPERTS_DP_NOTE: an expert's
gradient already sums the tokens of all ep ranks, so its reduction divides by the whole data-parallel size
(dp x cp) instead of that unit's mesh size (torchtitan's fsdp_gradient_divide_factor): the mean EP 1 takes.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from launcher.planning.parallel import check_tensor_parallel
from launcher.planning.plan import Plan
from launcher.train.engines.base import AUTOCAST_DTYPES, TorchEngine
from launcher.train.expert_parallel import shard_experts
from launcher.train.modeling import decoder_layers
from launcher.train.tensor_parallel import parallelize


class FSDPEngine(TorchEngine):
    uses_autocast = False

    def wrap(self, model: nn.Module, plan: Plan, device: torch.device) -> nn.Module:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        empty = any(p.is_meta for p in model.parameters())
        full_state = {} if empty else model.state_dict()  # rank 0's weights (on CPU), kept until broadcast
        buffers = {name: buf.to(device) for name, buf in model.named_buffers()} if empty else {}
        if plan.parallel.tp_enabled:
            config = model.config  # (refused before any rank starts too: launcher.jobdir.prepare)
            check_tensor_parallel(config.model_type, config.num_attention_heads, config.num_key_value_heads,
                                  plan.parallel.tp)
            parallelize(model, self.meshes.tp, plan.parallel.sequence_parallel)
        # fully_shard moves each unit's parameters to the mesh's device as it shards them: the whole model
        # is never on one GPU at once. The mesh is 1-D for FSDP; (replicate, shard) makes fully_shard HSDP.
        mesh = self.meshes.fsdp
        compute = AUTOCAST_DTYPES.get(plan.precision)
        # plan.offload optimizer+params: shards, their gradients and the optimizer states live in host memory
        # and the optimizer steps there (launcher.planning.plan.ENGINE_SUPPORT: FSDP offloads them only together).
        shard = {"mp_policy": MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None),
                 "offload_policy": CPUOffloadPolicy(pin_memory=device.type == "cuda") if plan.offloads else OffloadPolicy()}
        if plan.parallel.ep_enabled:
            self._shard_experts(model, plan, device, shard)
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, **shard)
        fully_shard(model, mesh=mesh, **shard)
        if empty:
            model.to_empty(device=device)
            with torch.no_grad():
                for name, buf in model.named_buffers():  # non-persistent ones (RoPE) are not broadcast
                    buf.copy_(buffers[name])
        if not getattr(model, "is_loaded_in_4bit", False):  # a 4-bit base is loaded alike on every rank
            set_model_state_dict(model, full_state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        return model

    def _shard_experts(self, model: nn.Module, plan: Plan, device: torch.device, shard: dict) -> None:
        """Split the experts over the ep ranks, each layer's an FSDP unit over the ranks outside ep whose gradient
        reduction divides by the whole data-parallel size (EXPERTS_DP_NOTE)."""
        for module in shard_experts(model, self.meshes.ep):
            fully_shard(module, mesh=self.meshes.experts_dp, **shard)
            module.set_gradient_divide_factor(plan.parallel.dp * plan.parallel.cp)
            # gloo has no PREMUL_SUM: sum, then divide; not on one shard, where torch would divide twice.
            module.set_force_sum_reduction_for_comms(device.type == "cpu"
                                                     and self.meshes["dp_shard_mod_ep"].size() > 1)

    def make_grad_scaler(self):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(self.device.type)

    def accumulating(self, final: bool):
        self.wrapped.set_requires_gradient_sync(final)
        return contextlib.nullcontext()
