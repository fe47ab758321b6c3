"""`llaunch plan --trace`: the peak of a real training step, traced by PyTorch's MemTracker on fake tensors.

The model is built truncated (1 and 2 decoder layers) under FakeTensorMode, so nothing is allocated; two
steps of forward + backward + the run's optimizer run under torch.distributed._tools MemTracker, and the peak is scaled
linearly by depth (every decoder layer adds the same saved tensors, gradients and states). The trace runs
the CPU kernels, so it checks the analytic estimator's terms rather than CUDA's allocator.

FSDP is traced at its world size in this one process, as torchtitan's memory estimation does: a fake process
group (backend "fake") makes every collective a no-op of the right shape, the engine's own `fully_shard` wraps
the model built on the meta device (LoRA adapters too), and FSDPMemTracker gives one rank's peak. With expert
parallelism the ranks' own meshes (launcher.train.device_mesh.RankMeshes) and expert split
(launcher.train.expert_parallel) are traced, each experts module an FSDP unit over the ranks outside ep, as
engines/fsdp.py builds them; the dispatch's count exchange, which a fake process group cannot carry, routes every
rank's tokens evenly (even_counts), as the estimator assumes.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

from launcher.errors import LaunchError
from launcher.planning.plan import TrainSetup
from launcher.planning.models import ModelSpec

TRACE_DEPTHS = (1, 2)


@dataclass
class TraceResult:
    peak_bytes: int  # scaled to the full depth
    by_depth: dict[int, int]


def trace_peak(spec: ModelSpec, setup: TrainSetup, depths: tuple[int, ...] = TRACE_DEPTHS) -> TraceResult:
    by_depth = {d: traced_step_peak(spec, setup, d) for d in depths}
    (d1, p1), (d2, p2) = sorted(by_depth.items())[:2]
    per_layer = (p2 - p1) / (d2 - d1)
    return TraceResult(peak_bytes=int(p1 + (spec.layers - d1) * per_layer), by_depth=by_depth)


def traced_step_peak(spec: ModelSpec, setup: TrainSetup, layers: int) -> int:
    """Peak bytes of two training steps of `spec` cut to `layers` decoder layers, on fake tensors."""
    if setup.is_fsdp and not setup.is_hsdp and setup.world_size > 1:
        return traced_fsdp_peak(spec, setup, layers)
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.planning.models import GPT2_LIKE
    from launcher.train.chunked_loss import use_chunked_loss
    from launcher.train.recompute import enable_recompute

    if setup.trains_adapters:  # PEFT moves adapters with Module.to(), which cannot swap fake parameters
        raise LaunchError("--trace supports full fine-tuning only (PEFT cannot wrap a fake-tensor model); drop --trace.")

    depth_key = "n_layer" if spec.model_type in GPT2_LIKE else "num_hidden_layers"
    config = AutoConfig.for_model(**{**spec.hf_config, depth_key: layers})
    dtype = torch.bfloat16 if setup.precision == "bf16" else torch.float32  # set at build: fake params cannot .to()
    with FakeTensorMode():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=traced_attention(setup.attention))
        model.config.use_cache = False
        enable_recompute(model, setup.activation_checkpointing, traced_saved_ops(setup.attention))
        use_chunked_loss(model, setup.loss_chunk_tokens)  # as engines.build_engine does for DDP and FSDP
        optimizer = traced_optimizer(setup.optimizer, model.parameters())
        tokens = torch.randint(0, spec.vocab, (setup.micro_batch, setup.seq_len))
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        peak = 0
        with tracker:
            for _ in range(2):  # the second step has optimizer states: the steady state
                tracker.reset_mod_stats()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setup.mixed_precision):
                    loss = model(input_ids=tokens, labels=tokens).loss
                loss.backward()
                peak = max(peak, _root_peak(tracker, model))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return max(peak, *(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values()))


def traced_fsdp_peak(spec: ModelSpec, setup: TrainSetup, layers: int) -> int:
    """One rank's peak of two FSDP2 steps at `setup.world_size` ranks, on a fake process group in this process."""
    import torch
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from launcher.train.device_mesh import RankMeshes
    from launcher.train.engines.base import AUTOCAST_DTYPES
    from launcher.train.expert_parallel import shard_experts
    from launcher.train.modeling import decoder_layers

    if dist.is_initialized():  # a real job's process group: never replace it with a fake one
        raise LaunchError("--trace of FSDP runs on a fake process group and cannot run inside a distributed job.")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=setup.world_size)
    try:
        # The meshes first: built under FakeTensorMode, init_device_mesh fails on a data-dependent rank lookup.
        meshes = RankMeshes.build(setup.parallel, "cpu")
        mesh = meshes.fsdp
        model = _meta_model(spec, setup, layers)
        compute = AUTOCAST_DTYPES.get(setup.precision)  # as engines/fsdp.py: cast for compute, reduce in fp32
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)
        if setup.parallel.ep_enabled:  # as engines/fsdp.py: the experts split over ep, an FSDP unit outside it
            for module in shard_experts(model, meshes.ep):
                module.exchange_counts = even_counts
                fully_shard(module, mesh=meshes.experts_dp, mp_policy=policy)
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        with FakeTensorMode(allow_non_fake_inputs=True):  # the meta shards become fake CPU tensors here
            model.to_empty(device="cpu")
            optimizer = traced_optimizer(setup.optimizer, [p for p in model.parameters() if p.requires_grad],
                                         dtensors=True)
            tokens = torch.randint(0, spec.vocab, (setup.micro_batch, setup.seq_len))
            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_inputs((tokens,))
            with tracker:
                for _ in range(2):  # the second step has optimizer states: the steady state
                    model(input_ids=tokens, labels=tokens).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    tracker.reset_mod_stats()
            return max(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())
    finally:
        dist.destroy_process_group()


def even_counts(experts, num_experts: int, ep) -> tuple:
    """launcher.train.expert_parallel.exchange_counts as the planner assumes the routing: every rank sends each
    expert an even share of its (token, expert) pairs (the remainder to the first experts, so the traced rank 0
    receives the most), and every rank routes alike. A fake process group's exchange carries no counts."""
    import torch

    ranks, pairs = ep.size(), experts.numel()
    local = num_experts // ranks
    per_expert = [pairs // num_experts + (e < pairs % num_experts) for e in range(num_experts)]
    send = [sum(per_expert[r * local:(r + 1) * local]) for r in range(ranks)]
    got = torch.tensor([per_expert[:local]] * ranks, dtype=torch.int64, device=experts.device)
    return got, send, [send[0]] * ranks


def _meta_model(spec: ModelSpec, setup: TrainSetup, layers: int, attention: str = ""):
    """`spec` cut to `layers` on the meta device, with the run's activation checkpointing and LoRA adapters
    (dropout off: the estimator does not count dropout masks), its attention `attention` or traced_attention's."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.config import FinetuneSection
    from launcher.planning.models import GPT2_LIKE
    from launcher.train.adapters import apply_finetune_method
    from launcher.train.chunked_loss import use_chunked_loss
    from launcher.train.recompute import enable_recompute

    if setup.method == "qlora":
        raise LaunchError("--trace cannot build bitsandbytes' 4-bit layers on fake tensors; drop --trace for QLoRA.")
    depth_key = "n_layer" if spec.model_type in GPT2_LIKE else "num_hidden_layers"
    config = AutoConfig.for_model(**{**spec.hf_config, depth_key: layers})
    dtype = torch.bfloat16 if setup.precision == "bf16" else torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation=attention or traced_attention(setup.attention))
    model.config.use_cache = False
    enable_recompute(model, setup.activation_checkpointing, traced_saved_ops(setup.attention))
    model = apply_finetune_method(model, FinetuneSection(method=setup.method, r=setup.lora_r, lora_dropout=0.0,
                                                        target_modules=list(setup.lora_targets)))
    use_chunked_loss(model, setup.loss_chunk_tokens)  # as engines.build_engine does for FSDP
    return model


TRACED_ATTENTION = "llaunch_traced_sdpa"  # no "flash" in it: transformers would look for a hub kernel


def traced_attention(attention: str) -> str:
    """Eager attention as it is; SDPA and flash-attn (the same saved tensors on a GPU) as their GPU memory."""
    return "eager" if attention == "eager" else register_traced_attention()


def traced_saved_ops(attention: str) -> tuple:
    """The traced attention's op, whose outputs selective recompute keeps as it keeps the real kernels'."""
    return () if attention == "eager" else (_flash_memory_op()._opoverload,)


def register_traced_attention() -> str:
    """An attention whose memory is CUDA flash / memory-efficient attention's, for traces on fake CPU tensors.

    The plan is for GPUs, where SDPA keeps q, k, v (k, v at their own head count: GQA is native), its output
    (laid out as o_proj reads it) and an fp32 logsumexp per head and token. On fake CPU tensors the kernel
    expands k and v to every head and keeps one more q-sized tensor (11 KB per token and layer for TinyLlama),
    which no GPU run allocates. Values are never computed on fake tensors, so only the shapes matter here.
    """
    from transformers import AttentionInterface

    flash_memory = _flash_memory_op()

    def attention(module, query, key, value, attention_mask, **kwargs):
        return flash_memory(query, key, value)[0], None

    AttentionInterface.register(TRACED_ATTENTION, attention)
    return TRACED_ATTENTION


@functools.cache
def _flash_memory_op():
    """llaunch::flash_memory: q, k, v -> SDPA's output (batch, tokens, heads, dim) and fp32 logsumexp, saving
    what flash attention saves. A custom op, so that selective recompute's policy (launcher.train.recompute)
    keeps its outputs as it keeps the real attention kernels'."""
    import torch

    @torch.library.custom_op("llaunch::flash_memory", mutates_args=(),
                             schema="(Tensor query, Tensor key, Tensor value) -> (Tensor, Tensor)")
    def flash_memory(query, key, value):
        batch, heads, tokens, dim = query.shape
        return query.new_empty(batch, tokens, heads, dim), query.new_empty(batch, heads, tokens, dtype=torch.float32)

    @flash_memory.register_fake
    def _(query, key, value):
        batch, heads, tokens, dim = query.shape
        return query.new_empty(batch, tokens, heads, dim), query.new_empty(batch, heads, tokens, dtype=torch.float32)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, *output)

    def backward(ctx, grad, grad_lse):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)

    flash_memory.register_autograd(backward, setup_context=setup_context)
    return flash_memory


def traced_optimizer(name: str, params, dtensors: bool = False):
    """The optimizer training.optim names, with the multi-tensor kernels CUDA would pick (CPU defaults to loops).

    Fused AdamW on CPU DTensors allocates what CUDA's fused kernel does not; the per-tensor loop, like the
    fused kernel, holds temporaries for one shard at a time, so it stands in for it there."""
    import torch

    if name in ("adamw_bnb_8bit", "paged_adamw_8bit"):
        raise LaunchError(f"--trace cannot run bitsandbytes' {name} on fake tensors; trace with --optimizer adamw_torch_fused.")
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.1, foreach=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-3, scale_parameter=False, relative_step=False)
    if name == "adamw_torch_fused" and dtensors:
        return torch.optim.AdamW(params, lr=1e-4, foreach=False)
    fused = name == "adamw_torch_fused"
    return torch.optim.AdamW(params, lr=1e-4, fused=fused or None, foreach=None if fused else True)


def _root_peak(tracker, model) -> int:
    stats = tracker.memory_tracking.get(model)
    if stats is None:
        return 0
    return max((dev["Total"] for snaps in stats.snapshots.values() for snap in snaps for dev in snap.values()), default=0)
