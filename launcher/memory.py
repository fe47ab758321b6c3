"""Peak GPU memory of one training step, per rank, as named terms.

The model is what PyTorch does, term by term, for a Hugging Face decoder trained by launcher.train:
- persistent: weights + optimizer states (+ DDP's gradient buckets, which outlive zero_grad);
- then the largest of three phases on top: the end of the forward (saved activations, logits and loss,
  low-precision weight copies), the backward (gradients + the layer being differentiated) and the optimizer
  step (gradients + the foreach AdamW scratch).
`peak_bytes` predicts torch.cuda.max_memory_allocated; `reserved_bytes` adds the caching allocator's slack
and the CUDA context, which is what must fit in the card. Calibration: bench/memory_truth.py (H100).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher.models import ModelSpec

GiB = 1024**3
CUDA_CONTEXT_BYTES = int(0.5 * GiB)  # CUDA context + cuBLAS/cuDNN workspaces, outside the allocator (H100, CUDA 12)
# Caching allocator: max_memory_reserved / max_memory_allocated was 1.01-1.34 (median 1.09) over 28 H100 runs
# (bench/results/memory-h100*.json); checkpointed steps fragment most. 15% covers 4 in 5 of them, the 5%
# planning headroom the rest.
ALLOCATOR_SLACK = 0.15
CPU_PROCESS_BYTES = int(1.0 * GiB)  # a Python + torch + transformers process before the model (CPU plans)
QLORA_BITS_PER_PARAM = 4.127  # nf4 + double quantization: 4 + 8/64 + 32/(64*256) bits (QLoRA paper, sec. 2)


@dataclass
class TrainSetup:
    """The knobs that change memory; a Plan (or a planner candidate) maps onto this one to one."""

    strategy: str = "ddp"
    offload: str = "none"
    method: str = "full"
    precision: str = "amp-bf16"
    optimizer: str = "adamw"
    attention: str = "sdpa"
    activation_checkpointing: bool = False
    lora_r: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    micro_batch: int = 1
    seq_len: int = 2048
    gradient_accumulation_steps: int = 1
    world_size: int = 1
    device: str = "cuda"


@dataclass
class Term:
    name: str
    bytes: int
    reason: str


@dataclass
class MemoryBreakdown:
    """Per-rank bytes by component; the peak is persistent + the largest phase, not the sum of all terms."""

    terms: list[Term]
    peak_bytes: int
    reserved_bytes: int
    peak_phase: str
    phases: dict[str, int]
    trainable_params: int
    frozen_params: int
    host_offload_bytes: int = 0  # per rank, in CPU RAM: what ZeRO-Offload moved off the GPU


    def __getitem__(self, name: str) -> int:
        return next(t.bytes for t in self.terms if t.name == name)

    def to_dict(self) -> dict[str, int]:
        data = {t.name: t.bytes for t in self.terms}
        data.update(peak_bytes=self.peak_bytes, reserved_bytes=self.reserved_bytes,
                    host_offload_bytes=self.host_offload_bytes)
        return data


def bytes_per_weight(precision: str) -> int:
    """amp-*: fp32 master weights under autocast (HF Trainer bf16=True); bf16: weights themselves bf16."""
    return 2 if precision == "bf16" else 4


def shards(strategy: str, world: int) -> dict[str, int]:
    """Over how many ranks each model state is split (ZeRO paper, sec. 5): P_os, P_os+g, P_os+g+p; FSDP = ZeRO-3."""
    return {
        "weights": world if strategy in ("zero3", "fsdp") else 1,
        "grads": world if strategy in ("zero2", "zero3", "fsdp") else 1,
        "optimizer": world if strategy in ("zero1", "zero2", "zero3", "fsdp") else 1,
    }


def estimate(spec: ModelSpec, setup: TrainSetup) -> MemoryBreakdown:
    world = max(1, setup.world_size)
    split = shards(setup.strategy, world)
    deepspeed = setup.strategy.startswith("zero")
    lora = setup.method in ("lora", "qlora")
    P = spec.num_params
    adapters = spec.lora_params(setup.lora_r, setup.lora_targets) if lora else 0
    trainable = adapters if lora else P
    frozen = P if lora else 0
    tokens = setup.micro_batch * setup.seq_len
    terms: list[Term] = []

    def add(name: str, value: float, reason: str) -> int:
        terms.append(Term(name, int(value), reason))
        return int(value)

    # --- model states -------------------------------------------------------------------------------
    if setup.method == "qlora":
        add("frozen_weights", qlora_base_bytes(spec), "QLoRA base: block linears in nf4 + double quant, the rest (embeddings, norms, head) in bf16")
    elif lora:
        add("frozen_weights", P * bytes_per_weight(setup.precision) / split["weights"],
            "LoRA base: every pretrained weight, frozen, in the weight dtype")
    weight_bytes = 2 if deepspeed and setup.precision != "fp32" else bytes_per_weight(setup.precision)
    adapter_bytes = 4  # PEFT keeps adapters fp32 (autocast_adapter_dtype) whatever the base dtype
    if lora:
        add("weights", adapters * adapter_bytes, "LoRA adapters: r x (in + out) per targeted linear, fp32")
    elif setup.offload == "optimizer+params":
        add("weights", 0, "offloaded to CPU (ZeRO-Infinity); gathered layer by layer (comm buffers)")
    else:
        reason = ("DeepSpeed keeps bf16/fp16 module weights" if weight_bytes == 2 and deepspeed
                  else f"{weight_bytes}-byte weights ({setup.precision})")
        add("weights", P * weight_bytes / split["weights"], reason + (f", 1/{world} per rank" if split["weights"] > 1 else ""))
    grad_bytes = adapter_bytes if lora else weight_bytes
    if setup.offload != "none":  # ZeRO-Offload streams reduced gradients to the CPU bucket by bucket
        grads = add("grads", 0, "gradients stream to the CPU optimizer (counted in the reduce bucket)")
    else:
        grads = add("grads", trainable * grad_bytes / split["grads"],
                    "one gradient per trainable weight, in its dtype" + (f", reduce-scattered to 1/{world}" if split["grads"] > 1 else ""))
    state_bytes, master_bytes = optimizer_bytes_per_param(setup.optimizer, "fp32" if lora else setup.precision,
                                                          deepspeed and not lora)
    optimizer = (state_bytes + master_bytes) * trainable / split["optimizer"]
    if setup.offload != "none":
        optimizer = 0
    add("optimizer", optimizer, f"{setup.optimizer}: {state_bytes} B/param of state"
        + (f" + {master_bytes} B fp32 master copy" if master_bytes else "")
        + (f", 1/{world} per rank" if split["optimizer"] > 1 else "")
        + (", offloaded to CPU" if setup.offload != "none" else ""))
    # --- activations, logits, copies ----------------------------------------------------------------
    per_layer = layer_activation_bytes(spec, setup)
    recompute = per_layer * tokens  # one layer's saved tensors, alive while that layer is differentiated
    if setup.activation_checkpointing:
        kept = spec.layers * tokens * spec.hidden * residual_bytes(setup)
        activations = kept
        act_reason = f"checkpointed: each layer's input kept; one layer ({per_layer} B/token) recomputed in backward"
    else:
        kept = 0
        activations = spec.layers * per_layer * tokens
        act_reason = f"{per_layer} B/token/layer saved for backward (norms, attention q/k/v/out, MLP, linear inputs)"
    activations = add("activations", activations, act_reason)
    logits = add("logits_loss", tokens * spec.vocab * logits_bytes_per_element(setup.precision),
                 "loss at the start of backward: fp32 log-softmax saved, its incoming gradient and its own gradient")
    copies = add("weight_copies", low_precision_copy_bytes(spec, setup, per_layer_only=setup.activation_checkpointing and lora),
                 "bf16 casts of fp32 matmul weights that autograd keeps for backward (autocast)")
    comm = add("comm_buffers", communication_bytes(spec, setup, world),
               COMM_REASONS.get(setup.strategy, ""))
    scratch = add("optimizer_scratch", 0 if setup.offload != "none" else step_scratch_bytes(setup, trainable / split["optimizer"]),
                  "foreach AdamW's sqrt(v) temporary during step()")

    # --- peak ---------------------------------------------------------------------------------------
    persistent = sum(t.bytes for t in terms if t.name in ("frozen_weights", "weights", "optimizer"))
    persistent += comm if setup.strategy == "ddp" else 0  # DDP allocates its buckets once, at wrap time
    grads_alive_in_forward = setup.gradient_accumulation_steps > 1  # accumulating: the next forward runs on top of them
    transient_comm = 0 if setup.strategy == "ddp" else comm
    phases = {
        "forward": activations + logits + copies + transient_comm + (grads if grads_alive_in_forward else 0),
        "backward": grads + kept + recompute + transient_comm + (0 if setup.activation_checkpointing else copies),
        "optimizer_step": grads + scratch,
    }
    phase = max(phases, key=phases.get)
    peak = persistent + phases[phase]
    if setup.device == "cpu":
        context, reason = CPU_PROCESS_BYTES, "Python + torch + transformers process (CPU run)"
    else:
        context, reason = CUDA_CONTEXT_BYTES, "CUDA context and kernel workspaces, outside the caching allocator"
    slack = int(peak * ALLOCATOR_SLACK)
    add("context_reserve", context + slack, f"{reason} + {ALLOCATOR_SLACK:.0%} allocator slack")
    return MemoryBreakdown(terms=terms, peak_bytes=peak, reserved_bytes=peak + slack + context, peak_phase=phase,
                           phases=phases, trainable_params=trainable, frozen_params=frozen,
                           host_offload_bytes=host_offload_bytes(spec, setup, trainable, world))


def host_offload_bytes(spec: ModelSpec, setup: TrainSetup, trainable: int, world: int) -> int:
    """CPU RAM per rank under ZeRO-Offload: fp32 master + Adam m, v + fp32 grads (16 B/param); params add bf16 weights."""
    if setup.offload == "none":
        return 0
    per_param = 16 + (2 if setup.offload == "optimizer+params" else 0)
    return int(trainable * per_param / world)


def qlora_base_bytes(spec: ModelSpec) -> float:
    """QLoRA (Dettmers et al. 2023): block linears as NF4 with double-quantized scales; the rest in bf16."""
    quantized = spec.block_linear_params
    return quantized * QLORA_BITS_PER_PARAM / 8 + (spec.num_params - quantized) * 2


def optimizer_bytes_per_param(optimizer: str, precision: str, deepspeed_full: bool) -> tuple[int, int]:
    """(state bytes, master-copy bytes) per trainable parameter.

    AdamW keeps m and v in the parameter's dtype (fp32 = 8 B, bf16 = 4 B; LoRA adapters are fp32); adamw-8bit keeps them as
    blockwise-quantized uint8 (2 B); SGD with momentum keeps one buffer. DeepSpeed's mixed precision adds an
    fp32 master copy of the weights (ZeRO paper's K = 12 for Adam: 4 + 4 + 4).
    """
    elem = 2 if precision == "bf16" and not deepspeed_full else 4
    state = {"adamw": 2 * elem, "adamw-8bit": 2, "sgd": elem}[optimizer]
    if deepspeed_full and precision != "fp32":
        return (8 if optimizer == "adamw" else state), 4
    return state, 0


def residual_bytes(setup: TrainSetup) -> int:
    """The residual stream: fp32 under autocast (fp32 embeddings + bf16 sublayer outputs promote), else the weight dtype."""
    return 2 if compute_mode(setup) == "half" else 4


def compute_mode(setup: TrainSetup) -> str:
    """autocast: fp32 weights, bf16 matmuls (DDP + amp-*); half: everything bf16/fp16 (bf16, FSDP/ZeRO mixed precision)."""
    if setup.precision == "fp32":
        return "fp32"
    if setup.precision.startswith("amp") and setup.strategy == "ddp" and setup.method != "qlora":
        return "autocast"
    return "half"


NORM_READER_GROUPS = ({"q_proj", "k_proj", "v_proj", "c_attn"}, {"gate_proj", "up_proj", "c_fc"})
NORM_READERS = set().union(*NORM_READER_GROUPS)


def layer_activation_bytes(spec: ModelSpec, setup: TrainSetup) -> int:
    """Bytes per token one decoder layer saves for backward, counted tensor by tensor for the HF Llama block.

    Checked against torch.cuda.max_memory_allocated on an H100 (bench/results/memory-h100.json).
    """
    mode = compute_mode(setup)
    act = 4 if mode == "fp32" else 2
    resid = residual_bytes(setup)
    h, f = spec.hidden, spec.ffn
    qd, kvd = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    lora = setup.method in ("lora", "qlora")
    names = {n for n, _, _ in spec.layer_linears}
    inputs = {n: i for n, i, _ in spec.layer_linears}
    # RMSNorm saves its fp32 input (for the variance) and, when its weight trains, the normalized tensor.
    total = 2 * (4 * h + (0 if lora else resid * h))
    # Attention (SDPA flash / mem-efficient) saves q, k, v, its output (which o_proj reads in place) and a logsumexp.
    total += act * (qd + 2 * kvd) + act * qd
    if setup.attention == "eager":
        total += spec.heads * setup.seq_len * (4 + act)  # fp32 softmax probabilities + their cast, per head
    # MLP: silu saves the gate output; the product saves silu(gate) and up.
    total += act * f * 3
    if not lora:
        # Each trained linear saves its input. Under autocast every reader of the fp32 norm output casts it
        # to bf16 on its own; otherwise q/k/v share one tensor and gate/up another. o_proj's input is the
        # attention output (counted), down_proj's is the silu*up product.
        if mode == "autocast":
            total += 2 * h * len(names & NORM_READERS)
        else:
            total += act * h * sum(1 for group in NORM_READER_GROUPS if group & names)
        total += act * f if names & {"down_proj", "mlp.c_proj"} else 0
    else:
        # Frozen base linears save no input. Each adapter's lora_A does: PEFT casts the input to the fp32
        # adapter dtype (4 B/elem) over a bf16 base, or autocast casts it to bf16 (2 B) over an fp32 base.
        per_elem = 2 if mode == "autocast" else 4
        for name in spec.lora_target_names(setup.lora_targets):
            total += per_elem * inputs[name]
    return int(total)


def logits_bytes_per_element(precision: str) -> int:
    """At the start of backward: fp32 log-softmax saved (4) + the incoming gradient (4) + log-softmax's gradient (4).

    HF's loss upcasts logits to fp32; the bf16 logits and the upcast (forward: 2 + 4 + 4 = 10 B) are gone by then.
    """
    return 12


def low_precision_copy_bytes(spec: ModelSpec, setup: TrainSetup, per_layer_only: bool) -> int:
    """Under autocast every fp32 matmul weight gets a bf16 copy that autograd saves (or autocast caches) until backward."""
    if compute_mode(setup) != "autocast":
        return 0
    if per_layer_only:
        return 2 * spec.block_linear_params // spec.layers + 2 * spec.vocab * spec.hidden
    return 2 * spec.linear_params


COMM_REASONS = {
    "ddp": "DDP's flat gradient buckets: a second copy of every gradient (gradient_as_bucket_view=False)",
    "fsdp": "FSDP2: one layer's bf16 parameters all-gathered (+ the prefetched next) and its fp32 gradients before reduce-scatter",
    "zero1": "ZeRO reduce and all-gather buckets (hidden^2 elements each, double-buffered by overlap_comm)",
    "zero2": "ZeRO reduce and all-gather buckets (hidden^2 elements each, double-buffered by overlap_comm)",
    "zero3": "ZeRO-3: the gathered layer and the prefetched next in bf16, plus the reduce bucket",
}


def communication_bytes(spec: ModelSpec, setup: TrainSetup, world: int) -> int:
    """Buffers collectives need on top of the model states; bucket sizes are those ds_configs/ renders (HF's rule)."""
    if world == 1 and setup.strategy in ("ddp", "fsdp"):
        return 0  # a single process is never wrapped
    lora = setup.method in ("lora", "qlora")
    trainable = spec.lora_params(setup.lora_r, setup.lora_targets) if lora else spec.num_params
    layer = spec.num_params // max(1, spec.layers)
    half = 4 if setup.precision == "fp32" else 2
    bucket = 2 * spec.hidden * spec.hidden * half  # double-buffered hidden^2 bucket
    if setup.strategy == "ddp":
        grad_bytes = 4 if lora or setup.precision != "bf16" else 2
        return trainable * grad_bytes
    if setup.strategy == "fsdp":
        return 2 * layer * half + layer * 4
    if setup.strategy == "zero3":
        return 2 * layer * half + bucket
    return 2 * bucket


def step_scratch_bytes(setup: TrainSetup, trainable_per_rank: float) -> int:
    """torch foreach AdamW materialises sqrt(v) for a whole param group; SGD and 8-bit Adam work in place."""
    if setup.optimizer != "adamw" or setup.strategy.startswith("zero"):
        return 0
    elem = 2 if setup.precision == "bf16" and setup.method == "full" else 4
    return int(trainable_per_rank * elem)
