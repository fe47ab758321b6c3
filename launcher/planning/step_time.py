"""Seconds per optimizer step of a candidate setup: compute at the GPU's peak times an efficiency that grows
with the micro-batch, the collectives that backward does not hide, and offload traffic. The planner ranks the
candidates that fit by it; the constants are measured or cited where they are set."""

from __future__ import annotations

from launcher.planning import expert_parallel as experts
from launcher.planning import memory_sizes as sizes
from launcher.planning import step_time_layout as layout
from launcher.planning.hardware import Hardware
from launcher.planning.models import ModelSpec
from launcher.planning.plan import TrainSetup

# Achieved / peak FLOP/s of a training step's compute at large matmuls, as good implementations reach it: 0.35 was
# measured for llaunch's own eager HF Llama step on one H100 (bench/results/throughput-h100.json); the published
# runs of bench/published_layouts.py (Llama 3, Megatron-LM, BLOOM, torchtitan; 18 rows) measured a median 1.77 x
# what that predicted, so 0.35 x 1.77. llaunch's eager loop runs below it (torch.compile closes part of the gap).
MATMUL_EFFICIENCY = 0.62
# Half of that is reached at 3,900 tokens per micro-batch on TinyLlama-1.1B (H100), whose decoder layer holds
# 44.0M matmul weights: a GEMM fills the GPU by its work (tokens x weights it multiplies), so a layer of W weights
# (on one tp rank: W / tp) reaches half at 3,900 x 44.0M / W tokens.
HALF_EFFICIENCY_WORK = 3900 * 44.0e6
LINK_EFFICIENCY = 0.8  # NCCL bus bandwidth / link bandwidth for large messages
# fp8 (torchao float8 training): the linears run at the GPU's fp8 peak x 0.67 of the bf16 efficiency (dynamic
# scaling's amax reductions and casts are memory-bound; attention stays bf16). Calibrated on torchtitan's
# benchmarks/llama3_h100_202412_torchtitan.md Tables 1 and 3 (Llama 3.1 8B at 8K on 8 and 128 H100, Float8 over
# compiled bf16: +28 % and +29 % tokens/s; each compute alone solves to 0.67 with the 12.5 % attention share of
# 8B's FLOPs; at 128 GPUs llaunch predicts +7 %, its FSDP collectives surfacing as the compute shrinks).
FP8_EFFICIENCY_RATIO = 0.67
BACKWARD_OVERLAP = 0.6  # share of compute that gradient/parameter collectives hide behind (backward is 2/3)
CPU_ADAM_PARAMS_PER_S = 1.0e9  # DeepSpeed CPUAdam throughput per rank (AVX-512, ZeRO-Offload paper fig. 9)


def recompute_passes(spec: ModelSpec, setup: TrainSetup) -> float:
    """The forward FLOPs recompute adds, in the units of 2 FLOPs per parameter and token that step_time_terms
    counts passes in: all of the forward under full recompute; under selective the decoder matmuls it runs again
    (launcher.planning.memory_sizes.selective_recomputed_linears; attention's output is kept). Full counts more
    than the ranks run (the LM head is not checkpointed, and the early stop skips each dense layer's last linear:
    1.47 passes for Llama 3 405B, not 2), as MATMUL_EFFICIENCY was calibrated with it; counted as run, Megatron's
    small GPT rows, over-predicted already, leave their band (bench/published_layouts.py)."""
    if setup.activation_checkpointing != "selective":
        return 2.0 if setup.full_recompute else 0.0
    again = sum(i * o for _, i, o in sizes.selective_recomputed_linears(spec))
    return 12 * spec.layers * again / spec.flops_per_token(setup.seq_len)


def step_time_terms(spec: ModelSpec, setup: TrainSetup, hw: Hardware, facts) -> dict[str, float]:
    """Seconds per optimizer step: compute at peak x efficiency, the data-parallel collectives not hidden by
    backward, the layout's own collectives and ep's all-to-alls (exposed), its pipeline bubble, and offload traffic;
    a mixture of experts' routed share of the compute runs as a grouped GEMM
    (expert_parallel.GROUPED_GEMM_EFFICIENCY)."""
    dims = setup.parallel
    tokens_per_replica = setup.micro_batch * setup.seq_len * setup.gradient_accumulation_steps
    # 2 FLOPs/param/token forward, 4 backward (input + weight grads); LoRA's frozen base skips weight grads;
    # full recompute runs the forward twice, selective the matmuls whose outputs it does not keep.
    passes = (2 + (2 if setup.trains_adapters else 4)) + recompute_passes(spec, setup)
    work = setup.micro_batch * setup.seq_len // dims.cp * spec.block_linear_params / spec.layers / dims.tp
    efficiency = MATMUL_EFFICIENCY * work / (work + HALF_EFFICIENCY_WORK)  # small matmuls under-fill the GPU
    flops = spec.flops_per_token(setup.seq_len) * tokens_per_replica * passes / 6 / dims.model_parallel
    attention_share = 6 * spec.layers * setup.seq_len * spec.heads * spec.head_dim / spec.flops_per_token(setup.seq_len)
    peak = facts.peak_flops[setup.flops_key]
    if setup.precision == "fp8":  # the linears' share on fp8 casts (FP8_EFFICIENCY_RATIO), attention in bf16
        peak /= attention_share + (1 - attention_share) * peak / (facts.peak_flops["fp8"] * FP8_EFFICIENCY_RATIO)
    compute = flops / (peak * efficiency) * experts.grouped_gemm_slowdown(spec)
    comm = communication_seconds(spec, setup, hw, facts)
    exposed = max(0.0, comm - BACKWARD_OVERLAP * compute)
    model_parallel = (layout.tensor_parallel_seconds(spec, setup, hw, facts)
                      + layout.pipeline_p2p_seconds(spec, setup, hw, facts)
                      + layout.context_parallel_seconds(spec, setup, hw, facts, attention_share * compute)
                      + expert_all_to_all_seconds(spec, setup, hw, facts))
    bubble = (compute + model_parallel) * layout.bubble_fraction(setup)
    offload = offload_seconds(spec, setup, facts)
    return {"compute_s": compute, "comm_s": comm + model_parallel, "exposed_comm_s": exposed + model_parallel,
            "bubble_s": bubble, "offload_s": offload}


def expert_all_to_all_seconds(spec: ModelSpec, setup: TrainSetup, hw: Hardware, facts) -> float:
    """ep's token dispatch and combine (launcher.planning.expert_parallel) of a rank's local tokens, counted
    exposed: overlapping them with compute (DeepSeek-V3's DualPipe) is not modelled."""
    tokens = layout.local_tokens(setup)
    act = 4 if setup.precision == "fp32" else 2
    return experts.all_to_all_seconds(spec, setup, hw, intra_node_bytes_per_s(hw, facts), tokens, act, LINK_EFFICIENCY)


def intra_node_bytes_per_s(hw: Hardware, facts) -> float:
    """A ring inside one node: NVLink (or PCIe without it)."""
    return hw.node_link_bytes_per_s(facts) * LINK_EFFICIENCY


def link_bytes_per_s(hw: Hardware, facts) -> float:
    """The slowest link a ring over every rank crosses: the network between nodes, else the node's own."""
    if hw.nodes > 1:
        return min(intra_node_bytes_per_s(hw, facts), hw.network_bytes_per_s * LINK_EFFICIENCY)
    return intra_node_bytes_per_s(hw, facts)


def communication_seconds(spec: ModelSpec, setup: TrainSetup, hw: Hardware, facts) -> float:
    """Per-rank bytes on the wire per step (ZeRO paper sec. 7: DDP/ZeRO-1/2 move 2 x params, ZeRO-3/FSDP 3 x),
    for the rank's 1 / (tp x pp) of the model (and 1 / ep of the routed experts) over its data-parallel group."""
    dims = setup.parallel
    world, share = dims.dp, 1 / (dims.tp * dims.pp)
    if world == 1:
        return 0.0
    ring = (world - 1) / world
    trainable = share * (spec.lora_params(setup.lora_r, setup.lora_targets) if setup.trains_adapters else spec.num_params)
    trainable *= experts.state_scale(spec, setup, 1, experts.expert_share(spec, setup, "grads"))  # ep's 1/ep of the experts
    grad_bytes = 4 if setup.trains_adapters or (not setup.is_deepspeed and setup.precision != "bf16") else 2
    param_bytes = 2 if setup.precision != "fp32" else 4
    micro_steps = setup.gradient_accumulation_steps
    if setup.grads_whole:
        volume = 2 * trainable * grad_bytes  # one all-reduce (or reduce-scatter + all-gather) per optimizer step
    elif setup.zero_stage == 2:
        volume = trainable * grad_bytes * micro_steps + trainable * param_bytes  # reduce-scatter each micro-step
    else:
        weights = share * (sizes.qlora_base_bytes(spec) if setup.method == "qlora" else spec.num_params * param_bytes)
        weights *= experts.state_scale(spec, setup, 1, experts.expert_share(
            spec, setup, "frozen_weights" if setup.trains_adapters else "weights"))
        gathers = 2 * weights * micro_steps  # all-gather params for forward and backward
        volume = gathers + trainable * grad_bytes * micro_steps
    if dims.dp_hybrid:
        # Gathers and reduce-scatters run inside the node; only each rank's reduced gradient shard is
        # all-reduced across nodes, once per optimizer step (no sync while accumulating).
        gpus, replicas = dims.dp_shard, dims.dp_replicate
        inside = volume * (gpus - 1) / gpus / intra_node_bytes_per_s(hw, facts)
        across = 2 * trainable / gpus * grad_bytes * (replicas - 1) / replicas
        return inside + across / (hw.network_bytes_per_s * LINK_EFFICIENCY)
    crosses_nodes = world * dims.tp * dims.cp > hw.gpus_per_node  # tp and cp take a node's GPUs first
    link = link_bytes_per_s(hw, facts) if crosses_nodes else intra_node_bytes_per_s(hw, facts)
    return volume * ring / link


def paging_seconds(paged_to_host_bytes: int, facts) -> float:
    """A paged optimizer's states that live in host RAM come in for the step and go out again for the next
    forward: twice over PCIe (fault-driven migration is slower than a copy; not measured here)."""
    return 2 * paged_to_host_bytes / facts.pcie_bytes_per_s


def offload_seconds(spec: ModelSpec, setup: TrainSetup, facts) -> float:
    """ZeRO-Offload: the trained weights' gradients down and weights up over PCIe, Adam on the CPU; parameter
    offload (ZeRO-Infinity, FSDP2's CPUOffloadPolicy) also streams every weight shard up for forward and backward."""
    if not setup.offloads:
        return 0.0
    trainable = spec.lora_params(setup.lora_r, setup.lora_targets) if setup.trains_adapters else spec.num_params
    shard = trainable / setup.world_size
    seconds = 2 * shard * 2 / facts.pcie_bytes_per_s + shard / CPU_ADAM_PARAMS_PER_S
    if setup.offload == "optimizer+params":
        weights = sizes.qlora_base_bytes(spec) if setup.method == "qlora" else spec.num_params * 2
        seconds += 2 * weights / setup.world_size * setup.gradient_accumulation_steps / facts.pcie_bytes_per_s
    return seconds
