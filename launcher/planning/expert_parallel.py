"""What expert parallelism (ep) does to a mixture of experts' memory and step time: the one home of the EP terms.

Sources:
- Sharding: torchtitan's ParallelDims / expert_parallel (github.com/pytorch/torchtitan, torchtitan/distributed/
  parallel_dims.py and expert_parallel.py) splits the routed experts over ep ranks borrowed from dp_shard x cp
  (each holds experts / ep of them, whole) and shards those again over the rest of that group (the dp_shard_mod_ep
  mesh); every other weight (attention, shared experts, dense layers, router) is sharded over dp_shard x cp as
  without ep. Megatron-Core's EP (docs.nvidia.com/megatron-core, "Mixture of Experts") does the same with its
  expert-data-parallel group (data-parallel size / ep) for the distributed optimizer. So one routed expert state
  per rank is split max(ep, data-parallel split) ways; the rest only by the data-parallel split.
- Expert tensor parallel (ParallelDims.etp, 1 or tp, torchtitan's expert_parallel.py): etp == tp splits each
  expert's gate_up / down over tp (ExpertTensorParallel) and every tp rank dispatches all of its group's tokens;
  etp == 1 keeps the experts whole and splits the tokens over tp before the dispatch (ReordererSequenceParallel),
  the tp ranks joining ep. Megatron-Core's --expert-tensor-parallel-size is the same choice.
- Token dispatch: dropless, as DeepSeek-V3 trains (arXiv 2412.19437, sec. 2.1.2: "does not drop any tokens") and
  as torchtitan and Megatron-Core's default token dispatcher run: each token goes to its top-k experts, so the
  dispatch buffer holds tokens x k x hidden and so does the combine buffer (no capacity factor to size).
- All-to-all: dispatch and combine in forward, their gradients in backward (4 per MoE layer per microbatch, 2 more
  under full recompute), each moving the (ep - 1) / ep of a rank's tokens x k x hidden that leave it.
"""

from __future__ import annotations

from launcher.errors import LaunchError
from launcher.planning.memory_sizes import ComputeMode, compute_mode, qlora_base_bytes, routed_expert_params
from launcher.planning.models import ModelSpec
from launcher.planning.plan import EP_MODEL_TYPES, LORA_METHODS, TrainSetup

# Grouped GEMM (Megatron-Core's moe_grouped_gemm, torchtitan's torch._grouped_mm) over a dense GEMM of the same
# FLOPs: an assumption, not measured here; each expert's smaller matmul fills the GPU less.
GROUPED_GEMM_EFFICIENCY = 0.85
ROUTER_LOGIT_BYTES = 4  # the router's logits and scores in fp32 (HF's MoE blocks upcast them for the softmax / sigmoid)
TOPK_INDEX_BYTES = 8  # top-k expert indices, int64
# Per routed copy of a token, the dispatch's bookkeeping that autograd keeps: the sort permutation and the source
# row of each copy (int64 gather indices), the inverse permutation of the combine (int64) and the copy's routing
# weight (fp32), as transformers.integrations.moe.grouped_mm_experts_forward keeps them. launcher.train.expert_parallel
# keeps one more int64 (the regrouping by local expert and its inverse): 0.06 % of a Qwen3-30B-A3B copy, not counted.
ROUTING_BYTES_PER_COPY = 3 * 8 + 4


def adapts_experts(spec: ModelSpec, method: str, targets: list[str]) -> bool:
    """Whether LoRA `targets` put adapters on the routed experts: PEFT (>= 0.18) maps all-linear and the names in
    MoESpec.lora_names onto their fused parameters through ParamWrapper, which adds each adapter's delta to the
    whole [experts, out, in] stack at every forward (peft/tuners/lora/layer.py)."""
    return bool(method in LORA_METHODS and spec.moe and set(spec.moe.lora_names[1:]) & spec.lora_target_names(targets))


def check_ep_runs(spec: ModelSpec, ep: int, method: str, targets: list[str]) -> None:
    """What the ranks' expert parallelism (launcher/train/expert_parallel.py) runs, refused in one sentence
    before any rank starts: the fused experts of EP_MODEL_TYPES, without adapters on them (ParamWrapper's delta
    spans every expert, where a rank holds experts / ep of them)."""
    if ep <= 1:
        return
    if spec.model_type not in EP_MODEL_TYPES:
        raise LaunchError(f"the ranks split the experts of {' and '.join(EP_MODEL_TYPES)} models over ep, not "
                          f"{spec.model_type}'s; train it with --ep 1.")
    if adapts_experts(spec, method, targets):
        raise LaunchError("LoRA on the routed experts (PEFT's ParamWrapper, a delta over every expert) does not run "
                          "under expert parallelism yet; train it with --ep 1, or adapt attention only "
                          "(finetune.target_modules: [q_proj, k_proj, v_proj, o_proj]).")


def expert_divisor(setup: TrainSetup, split: int) -> int:
    """Over how many ranks a routed expert state is split, where the other states are split `split` ways by the
    data-parallel part and tp ways by tp. Under etp == tp (or without ep) tp splits each expert: ep, or the
    split where it is larger (ep x the expert-data-parallel rest), times tp. Under etp == 1 the tp ranks are
    part of ep: ep, or split x tp where the data-parallel part shards over more (torchtitan's dp_shard_mod_ep)."""
    dims = setup.parallel
    if dims.experts_split_by_tp:
        return max(dims.ep, split) * dims.tp
    return max(dims.ep, split * dims.tp)


def state_scale(spec: ModelSpec, setup: TrainSetup, split: int, expert_share: float) -> float:
    """What ep multiplies a model state by, where that state is already split `split` ways and later tp ways
    (memory_layout.local_param_fraction): its routed-expert share (`expert_share` of its bytes) is split
    expert_divisor ways instead."""
    if not setup.parallel.ep_enabled or not expert_share:
        return 1.0
    return (1 - expert_share) + expert_share * split * setup.parallel.tp / expert_divisor(setup, split)


def expert_share(spec: ModelSpec, setup: TrainSetup, term: str) -> float:
    """The routed experts' share of a model-state term's bytes: of every weight, gradient and state under a full
    fine-tune; of the frozen base under LoRA (under QLoRA the experts stay bf16, memory_sizes.qlora_base_bytes);
    adapters are counted unsplit (an upper bound: PEFT's expert adapters follow their experts)."""
    routed = routed_expert_params(spec)
    if not routed:
        return 0.0
    if term == "frozen_weights":
        return routed * 2 / qlora_base_bytes(spec) if setup.method == "qlora" else routed / spec.num_params
    return 0.0 if setup.trains_adapters else routed / spec.num_params


def moe_bytes_per_token(spec: ModelSpec, mode: ComputeMode) -> float:
    """What an average layer saves per token for its routed experts (the shared ones are a dense MLP's, in
    memory_sizes.layer_activation_bytes), averaged over all layers, in compute `mode` (memory_sizes.compute_mode).

    Per MoE layer, tensor by tensor as transformers 5's grouped-GEMM experts and launcher.train.expert_parallel
    save them (tests/unit/test_memory_trace_moe.py traces them on fake tensors): the router's input (the norm
    output, unless the shared experts' gate / up already keep it) and its fp32 logits, top-k scores and indices;
    for each of the k routed copies of the token, the dispatched row (the dropless dispatch buffer, the experts'
    input), the fused gate_up output, silu(gate), the gated product (down's input), the expert's output before
    the weighted combine (the combine buffer) and ROUTING_BYTES_PER_COPY. The experts run as one grouped GEMM,
    which autocast does not cast: under autocast the rows stay fp32. A model's dense layers (DeepSeek-V3's
    first_k_dense_replace) save a dense MLP of the gap between their MLP and the shared experts."""
    if spec.moe is None:
        return 0.0
    moe, h = spec.moe, spec.hidden
    act, rows = mode.act_bytes, mode.weight_bytes  # the router's and dense matmuls' outputs; the experts' rows
    router_input = 0 if moe.shared_experts else act * h
    router = router_input + ROUTER_LOGIT_BYTES * moe.experts + (ROUTER_LOGIT_BYTES + TOPK_INDEX_BYTES) * moe.experts_per_token
    copy = rows * (2 * h + 4 * moe.expert_ffn) + ROUTING_BYTES_PER_COPY
    dense_layers = spec.layers - len(moe.layers)
    dense_ffn = next((o for n, _, o in moe.dense_layer_linears if n == "gate_proj"), 0) - moe.shared_experts * moe.expert_ffn
    dense = dense_layers * (act * 4 * dense_ffn + (0 if moe.shared_experts else act * h))
    return (len(moe.layers) * (router + moe.experts_per_token * copy) + dense) / spec.layers


def moe_layer_gradient_bytes_per_token(spec: ModelSpec, setup: TrainSetup) -> float:
    """The gradients alive at once in the last MoE layer's experts backward, the first after the loss's, per
    token (every activation still saved): for each routed copy, two hidden-wide (the expert output's and the
    dispatched row's) and three ffn-wide (the gated product's, silu's and up's), in the rows' dtype. MemTracker
    on fake tensors: 12.8 KB per copy of Qwen3-30B-A3B (2 x 2048 + 3 x 768 bf16 elements)."""
    if spec.moe is None:
        return 0.0
    rows = compute_mode(setup).weight_bytes
    return spec.moe.experts_per_token * rows * (2 * spec.hidden + 3 * spec.moe.expert_ffn)


def moe_whole_bytes_per_token(spec: ModelSpec, mode: ComputeMode, dims) -> float:
    """What of moe_bytes_per_token each of tp ranks keeps whole rather than 1/tp: the MoE block all-gathers its
    input over tp and runs the router on every token of the tp group (torchtitan's PrepareModuleInputOutput and
    NoParallel router), so its logits, scores and indices are whole. Where tp splits each expert (etp == tp, or
    no ep) every tp rank also dispatches all the routed copies and holds each one's input and combine row and
    its ROUTING_BYTES_PER_COPY whole, splitting only the ffn-wide gate_up, silu and product columns; under
    etp == 1 the copies are 1/tp per rank (the tokens split before the dispatch)."""
    if spec.moe is None or not dims.tp_enabled:
        return 0.0
    moe = spec.moe
    rows = mode.weight_bytes
    router = ROUTER_LOGIT_BYTES * moe.experts + (ROUTER_LOGIT_BYTES + TOPK_INDEX_BYTES) * moe.experts_per_token
    copy = rows * 2 * spec.hidden + ROUTING_BYTES_PER_COPY  # the dispatched and combined rows, the routing
    copies = moe.experts_per_token * copy if dims.experts_split_by_tp else 0
    return len(moe.layers) * (router + copies) / spec.layers


def routed_flops_share(spec: ModelSpec) -> float:
    """The routed experts' share of a token's matmul FLOPs: what runs as a grouped GEMM."""
    if spec.moe is None:
        return 0.0
    routed = len(spec.moe.layers) * spec.moe.experts_per_token * 3 * spec.hidden * spec.moe.expert_ffn
    return routed / spec.active_linear_params


def grouped_gemm_slowdown(spec: ModelSpec) -> float:
    """Compute time x this: the routed share runs at GROUPED_GEMM_EFFICIENCY of a dense GEMM."""
    share = routed_flops_share(spec)
    return (1 - share) + share / GROUPED_GEMM_EFFICIENCY


def all_to_all_seconds(spec: ModelSpec, setup: TrainSetup, hw, link_bytes_per_s: float,
                       tokens: int, act: int, link_efficiency: float) -> float:
    """Per step, exposed: every local MoE layer's dispatch and combine all-to-alls (module docstring) for each
    microbatch of `tokens` (a tp group's tokens, all-gathered before the MoE block), on NVLink while the ep group
    stays within a node (ParallelDims.ep_span), else the network. Under etp == 1 each tp rank dispatches 1/tp of
    them (torchtitan's ReordererSequenceParallel); under etp == tp every tp rank dispatches all of them to its
    expert shards, tp times the volume for the same tokens (the expert-TP price beside its smaller expert states)."""
    dims = setup.parallel
    if not dims.ep_enabled or spec.moe is None:
        return 0.0
    passes = 4 + (2 if setup.full_recompute else 0)
    dispatched = tokens / (1 if dims.etp_enabled else dims.tp)
    size = dispatched * spec.moe.experts_per_token * spec.hidden * act * (dims.ep - 1) / dims.ep
    volume = len(spec.moe.layers) / dims.pp * dims.pp_microbatches * passes * size
    link = link_bytes_per_s
    if dims.ep_span > hw.gpus_per_node:
        link = min(link, hw.network_bytes_per_s * link_efficiency)
    return volume / link
