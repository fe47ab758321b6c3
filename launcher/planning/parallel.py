"""The parallelism record: how a job's ranks split the work, validated in one place.

Like torchtitan's ParallelDims: data parallel (dp_replicate x dp_shard), tensor parallel with sequence parallel
(tp), pipeline parallel (pp, its schedule and microbatches), context parallel (cp), expert parallel (ep) and
expert tensor parallel (etp).
The strategy names describe the data-parallel part (ddp / zero1 / zero2 replicate the weights, fsdp / zero3
shard them, hsdp shards inside a replica); the other dimensions compose with any of them. A plan without
tp / pp / cp / ep (every plan written before this record) is pure data parallelism.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

from launcher.errors import LaunchError

# The decoders whose modules the ranks' tensor-parallel plan names (launcher/train/tensor_parallel.py).
TP_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")  # torch.distributed.pipelining's ScheduleGPipe, 1F1B, Interleaved1F1B
RECOMPUTES = ("none", "selective", "full")  # activation recompute: none, op-level SAC (launcher/train/recompute.py), every layer
# Selective recompute keeps the output of a layer's 1st, 3rd, 5th... matmul and recomputes the others (torchtitan's
# op-level SAC policy); the ranks' policy and the planner's count of what it keeps read this one rule.
SAC_SAVED_MATMUL_PARITY = 1


@dataclass(frozen=True)
class ParallelDims:
    """dp_replicate x dp_shard x cp x tp x pp ranks = the world; ep splits the routed experts over ranks it borrows,
    so it is not a factor of the world. pp_microbatches is the number of micro-batches each pipeline runs per
    optimizer step (the gradient accumulation of the data-parallel part).

    etp, the experts' own tensor-parallel degree, is 1 or tp (torchtitan's ParallelDims._validate: "Currently we
    only support ETP=TP or ETP=1"; Megatron-Core's --expert-tensor-parallel-size sets it apart from tp the same
    way, its "MoE parallel folding"). With etp == tp each expert is split over the tp ranks like a dense MLP and
    ep borrows from dp_shard x cp; with etp == 1 the tp ranks hold whole experts, split their tokens before the
    dispatch, and ep borrows from dp_shard x cp x tp (torchtitan's ReordererSequenceParallel). It matters only
    with ep: without it the experts follow tp like every other linear (torchtitan's TensorParallel on them)."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1  # 1 (every record written before it): whole experts on each tp rank
    pp_schedule: str = "1f1b"
    pp_microbatches: int = 1
    pp_virtual_stages: int = 1  # model chunks per pipeline rank (interleaved 1F1B's v)
    # With tp: the norms and residual stream split along the sequence too (Korthikanti et al. 2022; torchtitan's
    # TP plan always does); off, they are replicated on the tp ranks (Megatron-LM without --sequence-parallel).
    sequence_parallel: bool = True

    @property
    def dp(self) -> int:
        """Ranks that see different data and average their gradients."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    @property
    def model_parallel(self) -> int:
        """Ranks that hold one copy of the model between them: tp x pp x cp."""
        return self.tp * self.pp * self.cp

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def etp_enabled(self) -> bool:
        """The routed experts are split over the tp ranks (etp == tp) rather than whole on each."""
        return self.etp > 1

    @property
    def experts_split_by_tp(self) -> bool:
        """Whether tp splits each routed expert: always without ep, and with ep under etp == tp."""
        return self.tp_enabled and (self.etp_enabled or not self.ep_enabled)

    @property
    def ep_borrows(self) -> int:
        """The ranks of other dimensions that ep's group must take whole: cp, and tp too under etp == 1."""
        return self.cp * (1 if self.etp_enabled else self.tp)

    @property
    def ep_span(self) -> int:
        """Consecutive ranks one ep group spans (torchtitan's mesh order pp, dp_replicate, dp_shard, cp, tp): ep of
        them when it takes the tp ranks (etp == 1), ep x tp when it skips over them (etp == tp)."""
        return self.ep * self.etp

    @property
    def dp_shard_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def dp_hybrid(self) -> bool:
        """Sharded within a group and replicated across groups (HSDP): gradients all-reduce across the replicas."""
        return self.dp_replicate > 1 and self.dp_shard > 1

    @property
    def pure_data_parallel(self) -> bool:
        """Only data parallelism: what the ranks' engines run today."""
        return not (self.tp_enabled or self.pp_enabled or self.cp_enabled or self.ep_enabled)

    @property
    def stages(self) -> int:
        """Pipeline stages of the model: pp x virtual stages per rank."""
        return self.pp * self.pp_virtual_stages

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        """tp8 pp16(1f1b x 32) dp64, the dimensions in use."""
        parts = [f"tp{self.tp}"] if self.tp_enabled else []
        if self.pp_enabled:
            v = f" v{self.pp_virtual_stages}" if self.pp_virtual_stages > 1 else ""
            parts.append(f"pp{self.pp}({self.pp_schedule}{v} x{self.pp_microbatches})")
        parts += [f"cp{self.cp}"] if self.cp_enabled else []
        parts += [f"ep{self.ep}" + (f"(etp{self.etp})" if self.etp_enabled else "")] if self.ep_enabled else []
        dp = f"dp{self.dp_replicate}x{self.dp_shard}" if self.dp_replicate > 1 and self.dp_shard > 1 else f"dp{self.dp}"
        return " ".join(parts + [dp])


# Why the ranks do not run --cp (checked, not assumed, on torch 2.13): torch's ring attention dispatches only CUDA's
# SDPA kernels (torch/distributed/tensor/experimental/_context_parallel/_attention.py: _sdpa_handler's call_maps
# and custom_ops; _sharding_rules.py: register_cp_sharding_rules), while SDPA on CPU runs
# aten._scaled_dot_product_flash_attention_for_cpu, which DTensor refuses under context_parallel ("does not have a
# sharding strategy registered"; the math backend fails on a plain-tensor causal mask mixed with DTensors). With
# no CPU run to compare its losses against DDP's, llaunch has no CP path yet; the planner still sizes cp layouts.
CP_REFUSAL = ("--cp needs torch's ring attention, which in torch 2.13 dispatches only CUDA's flash, memory-efficient "
              "and cuDNN SDPA kernels (CPU's aten._scaled_dot_product_flash_attention_for_cpu has no "
              "context-parallel rule), so the ranks cannot be tested with it and do not run it; use --cp 1.")


@functools.lru_cache(maxsize=4096)
def layout_of(world: int, gpus_per_node: int, shards: bool, hsdp: bool, tp: int, pp: int, cp: int, ep: int, etp: int,
                   schedule: str, microbatches: int, virtual: int, sequence_parallel: bool) -> ParallelDims:
    """A plan's record (TrainSetup.parallel): tp / pp / cp / ep / etp as set, the ranks left over as data parallel,
    sharded (dp_shard) by the strategies that shard the weights, inside a node's remaining GPUs for HSDP. Made
    once per distinct layout: the planner's estimators ask for it ~50 times per candidate (a quarter of a
    16,384-GPU search's time went to building these frozen records)."""
    model_parallel = tp * pp * cp
    dp = max(1, world // model_parallel)
    shard = dp if shards else 1
    if hsdp:
        shard = math.gcd(dp, max(1, gpus_per_node // (tp * cp)))
    return ParallelDims(dp_replicate=dp // shard, dp_shard=shard, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp,
                        pp_schedule=schedule,
                        pp_microbatches=microbatches, pp_virtual_stages=virtual, sequence_parallel=sequence_parallel)


def check_layout(dims: ParallelDims, world: int, gpus_per_node: int, *, spec=None, seq_len: int = 0,
                 cross_node: bool = False) -> ParallelDims:
    """The one rule for a layout; LaunchError names the first thing that breaks it. `spec` (a ModelSpec) adds
    the model's own divisibility rules; `cross_node` allows tp x cp beyond one node (forced by the user)."""
    if dims.pp_schedule not in PP_SCHEDULES:
        raise LaunchError(f"--pp-schedule {dims.pp_schedule!r} is not one of {', '.join(PP_SCHEDULES)}.")
    if world % dims.model_parallel:
        raise LaunchError(f"tp {dims.tp} x pp {dims.pp} x cp {dims.cp} = {dims.model_parallel} does not divide the "
                          f"{world} GPUs; choose sizes whose product divides the GPU count.")
    if dims.world_size != world:
        raise LaunchError(f"the layout {dims.label()} covers {dims.world_size} ranks, not the {world} GPUs; "
                          f"regenerate the plan with `llaunch plan`.")
    if dims.tp * dims.cp > gpus_per_node and not cross_node:
        raise LaunchError(f"tp {dims.tp} x cp {dims.cp} spans more than the {gpus_per_node} GPUs of a node, so its "
                          f"per-layer collectives would cross the network; use tp x cp <= {gpus_per_node}.")
    _check_expert_tp(dims)
    if dims.pp_schedule != "interleaved-1f1b" and dims.pp_virtual_stages != 1:
        raise LaunchError(f"virtual pipeline stages need --pp-schedule interleaved-1f1b, not {dims.pp_schedule}.")
    if dims.pp_enabled and dims.pp_schedule == "interleaved-1f1b" and dims.pp_microbatches % dims.pp:
        raise LaunchError(f"interleaved 1F1B runs microbatches in rounds of pp: {dims.pp_microbatches} "
                          f"microbatches is not a multiple of pp {dims.pp}; choose --pp-microbatches accordingly.")
    if spec is not None:
        _check_model(dims, spec, seq_len)
    return dims


def _check_model(dims: ParallelDims, spec, seq_len: int) -> None:
    """What the model's shapes allow: heads over tp (KV heads too, or fewer replicated), layers over the
    pipeline stages, experts over ep, the sequence over 2 x cp (load-balanced causal ring attention)."""
    if spec.heads % dims.tp:
        raise LaunchError(f"{spec.name} has {spec.heads} attention heads, which tp {dims.tp} does not divide; "
                          f"choose a tp that divides {spec.heads}.")
    if spec.kv_heads % dims.tp and dims.tp % spec.kv_heads:
        raise LaunchError(f"{spec.name}'s {spec.kv_heads} KV heads can be neither split over nor replicated across "
                          f"tp {dims.tp}; choose a tp that divides or is a multiple of {spec.kv_heads}.")
    if spec.layers + 2 < dims.stages:  # the embedding and the LM head may hold a stage each (torchtitan's split)
        raise LaunchError(f"{spec.name}'s {spec.layers} layers, embedding and LM head do not fill {dims.stages} "
                          f"pipeline stages (pp {dims.pp} x {dims.pp_virtual_stages} virtual); choose at most "
                          f"{spec.layers + 2} stages.")
    experts = spec.moe.experts if spec.moe else 0
    if dims.ep_enabled and (experts < 2 or experts % dims.ep):
        what = f"{experts} experts, which ep {dims.ep} does not divide" if experts > 1 else "no experts"
        raise LaunchError(f"{spec.name} has {what}; use --ep 1 for a dense model or an ep that divides the experts.")
    whole = "cp x tp" if dims.ep_borrows != dims.cp else "cp"
    pool = f"dp_shard x {whole}"
    if dims.ep_enabled and (dims.dp_shard * dims.ep_borrows) % dims.ep:
        raise LaunchError(f"ep {dims.ep} borrows its ranks from {pool} = {dims.dp_shard * dims.ep_borrows} (etp "
                          f"{dims.etp}), which it does not divide; choose an ep that divides it.")
    if dims.ep_enabled and dims.ep % dims.ep_borrows:
        instead = f", or --etp {dims.tp} to split the experts over tp instead" if whole != "cp" else ""
        raise LaunchError(f"ep {dims.ep} borrows all of {whole} = {dims.ep_borrows} ranks and some of dp_shard's "
                          f"(torchtitan's ParallelDims, etp {dims.etp}), so it is a multiple of {dims.ep_borrows}; "
                          f"choose an ep that is a multiple of {dims.ep_borrows}{instead}.")
    if dims.cp_enabled and seq_len % (2 * dims.cp):
        raise LaunchError(f"--seq-len {seq_len} does not split into 2 x cp = {2 * dims.cp} equal chunks; choose a "
                          f"sequence length that is a multiple of {2 * dims.cp}.")


def _check_expert_tp(dims: ParallelDims) -> None:
    check_expert_tp(dims.tp, dims.etp, dims.ep)


def check_expert_tp(tp: int, etp: int, ep: int | None) -> None:
    """etp is 1 or tp (torchtitan's rule), and above 1 only beside ep (None: the planner's to choose): without ep,
    tp splits the experts anyway."""
    if etp not in (1, tp):
        raise LaunchError(f"--etp {etp} must be 1 (whole experts on each tp rank) or tp {tp} (each expert split "
                          f"over the tp ranks); choose --etp 1 or --etp {tp}.")
    if etp > 1 and ep is not None and ep <= 1:
        raise LaunchError(f"--etp {etp} chooses how tp splits the experts that ep distributes; without ep tp "
                          f"splits them already, so use --etp 1 or an --ep above 1.")


def check_tensor_parallel(model_type: str, heads: int, kv_heads: int, tp: int) -> None:
    """What the ranks' tensor-parallel plan splits: a decoder it names, whose query and KV heads tp divides (it
    splits KV heads and does not replicate them)."""
    if model_type not in TP_MODEL_TYPES:
        raise LaunchError(f"tensor parallelism runs on {', '.join(TP_MODEL_TYPES)} decoders, not {model_type}; "
                          f"train it with --tp 1.")
    if heads % tp or kv_heads % tp:
        raise LaunchError(f"tp {tp} must divide the {heads} attention heads and the {kv_heads} KV heads of this "
                          f"model; choose a --tp that divides {kv_heads}.")
