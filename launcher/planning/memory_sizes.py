"""Bytes of the tensors one training step holds, each by its own rule: weights and their copies, gradients,
optimizer states and scratch, activations, logits, communication buffers, checkpoints. launcher/planning/memory.py
adds them up into a rank's peak."""

from __future__ import annotations

import enum

from launcher.planning.models import ModelSpec
from launcher.planning.parallel import SAC_SAVED_MATMUL_PARITY
from launcher.planning.plan import ENGINE_SUPPORT, TrainSetup

# Logits at the start of backward, per element: the fp32 log-softmax saved (4) + the incoming gradient (4) +
# log-softmax's gradient (4), whatever the compute precision: HF's loss upcasts logits to fp32, and the bf16
# logits and the upcast (forward: 2 + 4 + 4 = 10 B) are gone by then.
LOGITS_BYTES_PER_ELEMENT = 12
# HF's RMSNorm computes in fp32; the final norm's backward, the first after the loss's, holds five fp32 tensors of
# the hidden size per token beside every saved activation (MemTracker on fake tensors: 640 MiB of temporaries
# for TinyLlama's 16K tokens x 2048 at the peak of a chunked-loss step, tests/unit/test_memory_trace.py).
FINAL_NORM_BACKWARD_BYTES = 5 * 4
QLORA_BITS_PER_PARAM = 4.127  # nf4 + double quantization: 4 + 8/64 + 32/(64*256) bits (QLoRA paper, sec. 2)
ADAPTER_BYTES = 4  # PEFT keeps adapters fp32 (autocast_adapter_dtype) whatever the base dtype


def bytes_per_weight(precision: str) -> int:
    """amp-*: fp32 master weights under autocast (HF Trainer bf16=True); bf16: weights themselves bf16."""
    return 2 if precision == "bf16" else 4


def shard_group(setup: TrainSetup) -> int:
    """How many ranks split the model states: the parallelism record's dp_shard for the strategies that shard
    the weights (HSDP: one node's GPUs, less tp x cp), its whole data-parallel group for ZeRO-1/2's states."""
    dims = setup.parallel
    return dims.dp_shard if setup.shards_params else dims.dp


def shards(setup: TrainSetup, group: int) -> dict[str, int]:
    """Over how many ranks each model state is split (ZeRO paper, sec. 5): P_os, P_os+g, P_os+g+p; FSDP = ZeRO-3
    (HSDP too, within its shard group)."""
    stage = 3 if setup.is_fsdp else setup.zero_stage
    return {"weights": group if stage >= 3 else 1, "grads": group if stage >= 2 else 1,
            "optimizer": group if stage >= 1 else 1}


def weight_element_bytes(setup: TrainSetup) -> int:
    """Bytes of one trained weight as the engine keeps it (DeepSpeed holds bf16/fp16 module weights)."""
    return 2 if setup.is_deepspeed and setup.precision != "fp32" else bytes_per_weight(setup.precision)


def gradient_element_bytes(setup: TrainSetup) -> int:
    return ADAPTER_BYTES if setup.trains_adapters else weight_element_bytes(setup)


def largest_trainable_elements(spec: ModelSpec, setup: TrainSetup) -> int:
    """The largest tensor the optimizer updates: an embedding / LM head matrix, else a layer's linear, or for
    adapters the largest lora_A / lora_B (r x max(in, out))."""
    if setup.trains_adapters:
        names = spec.lora_target_names(setup.lora_targets)
        return max(setup.lora_r * max(i, o) for n, i, o in spec.layer_linears if n in names)
    return max([spec.vocab * spec.hidden] + [i * o for _, i, o in spec.layer_linears])


def logits_tokens(setup: TrainSetup) -> int:
    """Tokens whose logits exist at once: one chunk of the chunked loss where the engine runs it, else all."""
    tokens = setup.micro_batch * setup.seq_len
    if setup.loss_chunk_tokens and ENGINE_SUPPORT[setup.strategy].chunked_loss:
        return min(tokens, setup.loss_chunk_tokens)
    return tokens


def host_offload_bytes(spec: ModelSpec, setup: TrainSetup, trainable: int, world: int) -> int:
    """CPU RAM per rank under ZeRO-Offload: fp32 master + Adam m, v + fp32 grads (16 B/param); params add bf16 weights."""
    if not setup.offloads:
        return 0
    if setup.is_fsdp:  # CPUOffloadPolicy: each rank's shard of every parameter, trained
        # ones with fp32 weight + gradient + AdamW m, v (16 B), frozen ones as they are stored
        frozen = (qlora_base_bytes(spec) if setup.method == "qlora"
                  else spec.num_params * bytes_per_weight(setup.precision) if setup.method == "lora" else 0)
        return int((frozen + trainable * 16) / shard_group(setup))
    per_param = 16 + (2 if setup.offload == "optimizer+params" else 0)
    return int(trainable * per_param / world)


def qlora_base_bytes(spec: ModelSpec) -> float:
    """QLoRA (Dettmers et al. 2023): block linears as NF4 with double-quantized scales; the rest (routed
    experts too) in bf16."""
    quantized = spec.quantized_params
    return quantized * QLORA_BITS_PER_PARAM / 8 + (spec.num_params - quantized) * 2


def optimizer_bytes_per_param(optimizer: str, precision: str, deepspeed_full: bool, flattened: bool) -> tuple[int, int]:
    """(state bytes, master-copy bytes) per trainable parameter, for the optimizer the run builds (training.optim).

    AdamW, fused or foreach, keeps m and v in the parameter's dtype (fp32 = 8 B, bf16 = 4 B; LoRA adapters are
    fp32); bitsandbytes' 8-bit AdamW keeps them blockwise-quantized (2 B; the paged one in CUDA unified memory,
    on the GPU until memory runs short); SGD with momentum keeps one buffer; Adafactor (no first moment) keeps
    a row and a column per matrix (factored_state_elements), but on DeepSpeed's flat 1-D partitions (`flattened`)
    it cannot factor and keeps a full second moment. DeepSpeed's mixed precision adds an fp32 master copy of the
    weights (ZeRO paper's K = 12 for Adam: 4 + 4 + 4), in fp32 too: ZeRO-1/2 always clone their partition
    (stage_1_and_2.py), and ZeRO-3 on 2 gloo ranks held a separate copy as well (tests/distributed/test_zero_states.py).
    """
    elem = state_element_bytes(precision, deepspeed_full)
    state = {"adamw_torch_fused": 2 * elem, "adamw_torch": 2 * elem, "adamw_bnb_8bit": 2, "paged_adamw_8bit": 2,
             "sgd": elem, "adafactor": elem if flattened else 0}[optimizer]
    return state, (4 if deepspeed_full else 0)


def state_element_bytes(precision: str, deepspeed_full: bool) -> int:
    """Optimizer states take the dtype of what they update: bf16 weights, else fp32 (DeepSpeed steps fp32 partitions)."""
    return 2 if precision == "bf16" and not deepspeed_full else 4


def factored_state_elements(spec: ModelSpec, setup: TrainSetup) -> int:
    """Adafactor's second moment: rows + columns of every matrix it updates, and 1-D parameters (norms) in full."""
    if setup.trains_adapters:  # lora_A is r x in, lora_B is out x r
        names = spec.lora_target_names(setup.lora_targets)
        return spec.layers * sum((setup.lora_r + i) + (o + setup.lora_r) for n, i, o in spec.layer_linears if n in names)
    matrices = spec.block_linear_params + spec.embedding_params + spec.lm_head_params
    heads = 1 if spec.tied_embeddings else 2
    return (spec.layers * sum(i + o for _, i, o in spec.layer_linears) + heads * (spec.vocab + spec.hidden)
            + max(0, spec.num_params - matrices))


class ComputeMode(enum.Enum):
    """How a step computes, which sets the bytes of what it saves (compute_mode)."""
    FP32 = "fp32"  # everything fp32
    AUTOCAST = "autocast"  # fp32 weights, bf16 matmuls (DDP + amp-*)
    HALF = "half"  # everything in the weights' bf16 / fp16 (bf16; FSDP / ZeRO mixed precision)

    @property
    def act_bytes(self) -> int:
        """A matmul's output: bf16 but in fp32."""
        return 4 if self is ComputeMode.FP32 else 2

    @property
    def weight_bytes(self) -> int:
        """The weights' dtype, which whatever autocast does not cast keeps: the residual stream (fp32 embeddings
        and bf16 sublayer outputs promote), the experts' rows (autocast leaves the grouped GEMM alone), a trained
        LM head's gradient."""
        return 2 if self is ComputeMode.HALF else 4


def compute_mode(setup: TrainSetup) -> ComputeMode:
    if setup.precision == "fp32":
        return ComputeMode.FP32
    if setup.mixed_precision and setup.is_ddp and setup.method != "qlora":
        return ComputeMode.AUTOCAST
    return ComputeMode.HALF


def residual_bytes(setup: TrainSetup) -> int:
    return compute_mode(setup).weight_bytes


NORM_READER_GROUPS = ({"q_proj", "k_proj", "v_proj", "c_attn"}, {"gate_proj", "up_proj", "c_fc"})
NORM_READERS = set().union(*NORM_READER_GROUPS)
ROW_PARALLEL = {"o_proj", "down_proj", "attn.c_proj", "mlp.c_proj"}  # split by input rows under tp; the rest by columns


# A layer's last linear: its output only joins the residual stream, so no backward reads it and recompute stops
# before it (launcher/train/recompute.py keeps it neither).
LAYER_OUTPUT_LINEARS = ("down_proj", "mlp.c_proj")


def selective_kept_linears(spec: ModelSpec) -> list[tuple[str, int, int]]:
    """The linears whose outputs selective recompute keeps: a layer's 1st, 3rd, ... matmul in forward order
    (SAC_SAVED_MATMUL_PARITY) but its last (LAYER_OUTPUT_LINEARS)."""
    return [linear for k, linear in enumerate(spec.layer_linears)
            if (k + 1) % 2 == SAC_SAVED_MATMUL_PARITY and linear[0] not in LAYER_OUTPUT_LINEARS]


def selective_recomputed_linears(spec: ModelSpec) -> list[tuple[str, int, int]]:
    """The linears selective recompute runs again in backward: neither kept nor the layer's last."""
    kept = selective_kept_linears(spec)
    return [linear for linear in spec.layer_linears if linear not in kept and linear[0] not in LAYER_OUTPUT_LINEARS]


def layer_activation_bytes(spec: ModelSpec, setup: TrainSetup) -> int:
    """Bytes per token one decoder layer saves for backward, counted tensor by tensor for the HF Llama block.

    Checked against torch.cuda.max_memory_allocated on an H100 (bench/results/memory-h100.json).
    """
    mode = compute_mode(setup)
    act = mode.act_bytes
    resid = residual_bytes(setup)
    # A mixture of experts' routed experts are launcher.planning.expert_parallel.moe_bytes_per_token's: here the
    # MLP is the shared experts' (none in Mixtral / Qwen3-MoE, whose layer_linears then hold no MLP at all).
    h, f = spec.hidden, spec.ffn - spec.routed_ffn
    qd, kvd = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    lora = setup.trains_adapters
    names = {n for n, _, _ in spec.layer_linears}
    inputs = spec.lora_inputs()
    # RMSNorm saves its fp32 input (for the variance) and, when its weight trains, the normalized tensor.
    total = 2 * (4 * h + (0 if lora else resid * h))
    # Attention (SDPA flash / mem-efficient) saves q, k, v, its output (which o_proj reads in place) and a logsumexp.
    total += act * (qd + 2 * kvd) + act * qd
    if spec.qk_norm:  # Qwen3 / Gemma 3's RMSNorm on q and k saves its fp32 input, and the normalized q, k if trained
        total += (4 + (0 if lora else act)) * (qd + kvd)
    if setup.attention == "eager":
        total += spec.heads * setup.seq_len * (4 + act)  # fp32 softmax probabilities + their cast, per head
    # MLP: silu saves the gate output; the product saves silu(gate) and up.
    total += act * f * 3
    # Sharding engines cast the whole module, adapters included, to the compute dtype (FSDP's MixedPrecisionPolicy,
    # DeepSpeed's bf16): PEFT then has no fp32 cast to make, and adapters share their inputs as full linears do.
    adapters_cast = lora and mode is ComputeMode.HALF and not setup.is_ddp
    if adapters_cast:
        names = spec.lora_target_names(setup.lora_targets)
    if not lora or adapters_cast:
        # Each trained linear saves its input. Under autocast every reader of the fp32 norm output casts it
        # to bf16 on its own; otherwise q/k/v share one tensor and gate/up another. o_proj's input is the
        # attention output (counted), down_proj's is the silu*up product.
        if mode is ComputeMode.AUTOCAST:
            total += 2 * h * len(names & NORM_READERS)
        else:
            total += act * h * sum(1 for group in NORM_READER_GROUPS if group & names)
        total += act * f if names & {"down_proj", "mlp.c_proj"} else 0
    else:
        # Frozen base linears save no input. Each adapter's lora_A does: PEFT casts the input to the fp32
        # adapter dtype (4 B/elem) over a bf16 base, or autocast casts it to bf16 (2 B) over an fp32 base.
        per_elem = 2 if mode is ComputeMode.AUTOCAST else 4
        for name in spec.lora_target_names(setup.lora_targets):
            total += per_elem * inputs[name]
    return int(total)


def low_precision_copy_bytes(spec: ModelSpec, setup: TrainSetup, per_layer_only: bool) -> int:
    """Under autocast every fp32 matmul weight gets a bf16 copy that autograd saves (or autocast caches) until backward."""
    if compute_mode(setup) is not ComputeMode.AUTOCAST:
        return 0
    if per_layer_only:
        return 2 * spec.block_linear_params // spec.layers + 2 * spec.vocab * spec.hidden
    return 2 * spec.linear_params


COMM_REASONS = {
    "ddp": "DDP's flat gradient buckets: a second copy of every gradient (gradient_as_bucket_view=False)",
    "fsdp": "FSDP2: the root's parameters (embeddings, LM head) and a layer's (+ the prefetched next) gathered in the compute dtype; in backward also a layer's fp32 gradients before reduce-scatter",
    "hsdp": "FSDP2 within the node: the root's and a layer's (+ the prefetched next) gathered parameters; in backward a layer's fp32 gradients before reduce-scatter (then their 1/gpus shard is all-reduced across nodes)",
    "zero1": "ZeRO reduce and all-gather buckets (hidden^2 elements each, double-buffered by overlap_comm)",
    "zero2": "ZeRO reduce and all-gather buckets (hidden^2 elements each, double-buffered by overlap_comm)",
    "zero3": "ZeRO-3: the gathered layer and the prefetched next in bf16, plus the reduce bucket",
}


def communication_bytes(spec: ModelSpec, setup: TrainSetup, world: int) -> int:
    """Buffers collectives need on top of the model states; bucket sizes are those ds_configs/ renders (HF's rule)."""
    if (world == 1 or setup.parallel.dp == 1) and not setup.is_deepspeed:
        return 0  # no data-parallel peer (one process, or one tp x pp replica): never wrapped
    lora = setup.trains_adapters
    trainable = spec.lora_params(setup.lora_r, setup.lora_targets) if lora else spec.num_params
    layer = spec.num_params // max(1, spec.layers)
    half = 4 if setup.precision == "fp32" else 2
    bucket = 2 * spec.hidden * spec.hidden * half  # double-buffered hidden^2 bucket
    if setup.is_ddp:
        grad_bytes = 4 if lora or setup.precision != "bf16" else 2
        return trainable * grad_bytes
    if setup.is_fsdp:
        return fsdp_gathered_bytes(spec, setup) + fsdp_gradient_buffer_bytes(spec, setup, world)
    if setup.zero_stage == 3:
        return 2 * layer * half + bucket
    return 2 * bucket


SCRATCH_REASONS = {
    "adamw_torch_fused": "fused AdamW updates in place: no temporary",
    "adamw_torch": "foreach AdamW's sqrt(v) temporary for a whole parameter group during step()",
    "adamw_bnb_8bit": "bitsandbytes' 8-bit AdamW updates in place, block by block",
    "paged_adamw_8bit": "bitsandbytes' 8-bit AdamW updates in place, block by block",
    "sgd": "foreach SGD adds weight decay into a copy of the gradients (training.weight_decay > 0, the default)",
    "adafactor": "Adafactor, one parameter at a time: grad^2, the update and its negation in fp32 (+ fp32 copies of half-precision grads and weights)",
}


def routed_expert_params(spec: ModelSpec) -> int:
    """Every routed expert's parameters, all MoE layers: what ep splits (launcher.planning.expert_parallel)."""
    return len(spec.moe.layers) * spec.moe.experts * spec.moe.expert_params(spec.hidden) if spec.moe else 0


def fsdp_layer_params(spec: ModelSpec, setup: TrainSetup) -> int:
    """A decoder layer's parameters (the average layer) that FSDP2 gathers on a rank before the tp split. With ep,
    the routed experts are a unit of their own over the ranks outside ep (engines/fsdp.py), which gathers only
    the rank's experts / ep: ep's share of them, tp's too under etp == 1, where the tp ranks are part of ep and
    each expert is whole (communication_term's / tp is then undone here)."""
    layer = (spec.num_params - spec.embedding_params - spec.lm_head_params) / max(1, spec.layers)
    dims = setup.parallel
    if dims.ep_enabled and spec.moe:
        held = 1 / dims.ep if dims.experts_split_by_tp else dims.tp / dims.ep
        layer -= routed_expert_params(spec) / max(1, spec.layers) * (1 - held)
    return int(layer)


def fsdp_gathered_bytes(spec: ModelSpec, setup: TrainSetup) -> int:
    """FSDP2 (engines/fsdp.py: each decoder layer, then the root): the root's parameters (embeddings, final norm,
    LM head) stay gathered from the first layer to the loss, plus the running decoder layer and the prefetched
    next one, in the MixedPrecisionPolicy's dtype (seen in FSDPMemTracker traces at 8-512 ranks)."""
    half = 4 if setup.precision == "fp32" else 2
    root = spec.embedding_params + spec.lm_head_params
    if setup.method == "qlora":  # a layer gathers its packed 4-bit weights; the root's stay bf16
        return int(root * 2 + 2 * (qlora_base_bytes(spec) - root * 2) / max(1, spec.layers))
    return root * half + 2 * fsdp_layer_params(spec, setup) * half


def fsdp_gradient_buffer_bytes(spec: ModelSpec, setup: TrainSetup, world: int) -> int:
    """One decoder layer's unsharded gradients, in the fp32 reduce dtype, waiting for their reduce-scatter."""
    if world == 1:
        return 0
    if setup.trains_adapters:
        return spec.lora_params(setup.lora_r, setup.lora_targets) // max(1, spec.layers) * 4
    return fsdp_layer_params(spec, setup) * 4


def step_scratch_bytes(spec: ModelSpec, setup: TrainSetup, trainable_per_rank: float, grad_bytes: int) -> int:
    """What step() allocates beyond the states (SCRATCH_REASONS says what); DeepSpeed steps flat fp32 partitions."""
    deepspeed = setup.is_deepspeed
    elem = 4 if deepspeed else grad_bytes
    if setup.optimizer in ("adamw_torch", "sgd"):
        return int(trainable_per_rank * elem)
    if setup.optimizer != "adafactor":
        return 0
    if deepspeed:
        largest, copies = trainable_per_rank, 2  # one flat fp32 partition per group
    else:
        lora = setup.trains_adapters
        names = spec.lora_target_names(setup.lora_targets) if lora else None
        largest = max([setup.lora_r * max(i, o) for n, i, o in spec.layer_linears if n in names] if lora
                      else [spec.vocab * spec.hidden] + [i * o for _, i, o in spec.layer_linears])
        largest /= shard_group(setup) if setup.is_fsdp else 1  # FSDP steps each rank's shard
        copies = 2 + (2 if grad_bytes == 2 else 0)  # half grads and weights are upcast to fp32 for the update
    return int(largest * 4 * copies)


def checkpoint_bytes(params: int, trainable: int, setup: TrainSetup) -> int:
    """One checkpoint on disk, every rank's shards together (what `llaunch doctor` checks free space against):
    every weight in its training dtype (a LoRA base too: the larger answer is the safe one), plus the optimizer
    state and master copy of the trainable ones, as `estimate` counts them before sharding."""
    lora, deepspeed = setup.trains_adapters, setup.is_deepspeed
    state, master = optimizer_bytes_per_param(setup.optimizer, "fp32" if lora else setup.precision,
                                              deepspeed and not lora, deepspeed)
    return int(params * bytes_per_weight(setup.precision) + trainable * (state + master))
