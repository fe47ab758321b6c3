"""Engines: thin adapters (DDP, FSDP2, DeepSpeed ZeRO) behind the one protocol in base.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from launcher.planning.plan import ENGINE_SUPPORT
from launcher.train.chunked_loss import ROUTED_MODEL_TYPES, use_chunked_loss
from launcher.train.engines.base import Engine


@contextlib.contextmanager
def model_construction(plan, training, deepspeed_overrides: dict, rank: int, hidden_size: int,
                       quantized: bool) -> Iterator[bool]:
    """How this rank builds the model its engine will wrap; yields whether to build it empty (on meta).

    Neither sharding engine lets every rank build the full fp32 model (for 70B on 8 ranks that is 8 x 280 GB
    of host memory): FSDP builds it on rank 0 only and broadcasts into the shards; ZeRO-3 builds it inside
    deepspeed.zero.Init, which transformers enters (and loads pretrained weights through) while an
    HfDeepSpeedConfig is alive. A 4-bit (QLoRA) base is loaded whole on every rank (bitsandbytes quantizes it as
    it loads; a quarter of the bf16 size) and then sharded by FSDP2 or ZeRO-3 like any weight."""
    if quantized or not plan.shards_params or plan.parallel.pp_enabled:  # a pipeline rank keeps only its stages
        yield False
    elif plan.is_fsdp:
        yield rank != 0
    else:
        from launcher.train.engines.deepspeed import zero3_construction

        with zero3_construction(plan, training, hidden_size, deepspeed_overrides):
            yield False


def build_engine(model, plan, training, device, deepspeed_overrides: dict, meshes) -> Engine:
    """The engine the plan's strategy names; imports only that engine's library. The model computes its loss in
    chunks (plan.loss_chunk_tokens) where the engine declares it can (launcher.planning.plan.ENGINE_SUPPORT).
    Elsewhere an MoE's own forward adds its router's aux loss, Hugging Face's way (coef x aux per micro-batch).
    A pipeline-parallel plan runs its stages under the strategy's data parallelism (engines.pipeline), on the
    ranks' `meshes` (launcher.train.device_mesh.RankMeshes), which the torch engines use too."""
    if plan.parallel.pp_enabled:
        from launcher.train.engines.pipeline import PipelineEngine

        return PipelineEngine(model, plan, training, device, meshes)
    chunked = ENGINE_SUPPORT[plan.strategy].chunked_loss and use_chunked_loss(model, plan.loss_chunk_tokens)
    if not chunked and model.config.model_type in ROUTED_MODEL_TYPES:
        model.config.output_router_logits = True
    if plan.is_ddp:
        from launcher.train.engines.ddp import DDPEngine

        return DDPEngine(model, plan, training, device, meshes)
    if plan.is_fsdp:
        from launcher.train.engines.fsdp import FSDPEngine

        return FSDPEngine(model, plan, training, device, meshes)
    from launcher.train.engines.deepspeed import DeepSpeedEngine

    return DeepSpeedEngine(model, plan, training, device, deepspeed_overrides)
