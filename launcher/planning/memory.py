"""Peak GPU memory of one training step, per rank, as named terms.

The model is what PyTorch does, term by term, for a Hugging Face decoder trained by launcher.train:
- persistent: weights + optimizer states (+ DDP's gradient buckets, which outlive zero_grad);
- then the largest of three phases on top: the end of the forward (saved activations, logits and loss,
  low-precision weight copies), the backward (gradients + the layer being differentiated) and the optimizer
  step (gradients + the foreach AdamW scratch).
`peak_bytes` predicts torch.cuda.max_memory_allocated; `reserved_bytes` adds the caching allocator's slack
and the CUDA context, which is what must fit in the card. Calibration: bench/memory_truth.py (H100).
Each term's size is its own rule in launcher/planning/memory_sizes.py; this module adds them up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from launcher.planning.models import ModelSpec
from launcher.planning import expert_parallel as experts
from launcher.planning import memory_layout as layout
from launcher.planning import memory_sizes as sizes
from launcher.planning.plan import TrainSetup

GiB = 1024**3
CUDA_CONTEXT_BYTES = int(0.5 * GiB)  # CUDA context + cuBLAS/cuDNN workspaces, outside the allocator (H100, CUDA 12)
# Caching allocator: max_memory_reserved / max_memory_allocated was 1.01-1.34 (median 1.09) over 28 H100 runs
# (bench/results/memory-h100*.json); checkpointed steps fragment most. 15% covers 4 in 5 of them, the 5%
# planning headroom the rest.
ALLOCATOR_SLACK = 0.15
CPU_PROCESS_BYTES = int(1.0 * GiB)  # a Python + torch + transformers process before the model (CPU plans)


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
    # Per rank, in CUDA unified memory (a paged optimizer's states): on the GPU while it has room, paged to host
    # RAM when it runs short. Only their working set is in the terms and the peak.
    paged_bytes: int = 0
    at_peak: dict[str, int] = field(default_factory=dict)  # what is alive at the peak, by term; sums to reserved_bytes

    def __getitem__(self, name: str) -> int:
        return next(t.bytes for t in self.terms if t.name == name)

    def paged_to_host(self, limit_bytes: int) -> int:
        """The paged optimizer states a GPU of `limit_bytes` cannot keep: beyond the working set in the peak,
        what the rest of the card does not hold lives in host RAM and pages in for each step."""
        if not self.paged_bytes:
            return 0
        return max(0, self.paged_bytes - self["optimizer"] - max(0, limit_bytes - self.reserved_bytes))

    def to_dict(self) -> dict[str, int]:
        data = {t.name: t.bytes for t in self.terms}
        data.update(peak_bytes=self.peak_bytes, reserved_bytes=self.reserved_bytes,
                    host_offload_bytes=self.host_offload_bytes, paged_bytes=self.paged_bytes)
        return data


MODEL_STATES = ("frozen_weights", "weights", "optimizer")  # alive for the whole run
PAGED_OPTIMIZERS = ("paged_adamw_8bit",)  # states in CUDA unified memory (bitsandbytes' paged optimizers)


def estimate(spec: ModelSpec, setup: TrainSetup) -> MemoryBreakdown:
    """Every term of one rank's memory, and the peak: the model states plus the largest phase of the step; under
    pipeline parallelism the larger of the first stage's and the last stage's (launcher.planning.memory_layout)."""
    return max((estimate_stage(spec, setup, stage) for stage in layout.stages(setup)), key=lambda m: m.reserved_bytes)


def estimate_stage(spec: ModelSpec, setup: TrainSetup, stage: str) -> MemoryBreakdown:
    world, group = max(1, setup.world_size), sizes.shard_group(setup)
    split = sizes.shards(setup, group)
    trainable = spec.lora_params(setup.lora_r, setup.lora_targets) if setup.trains_adapters else spec.num_params
    fraction = layout.local_param_fraction(spec, setup, stage)
    terms = model_state_terms(spec, setup, trainable, split, group)
    if setup.parallel.ep_enabled:  # routed experts split over ep (launcher.planning.expert_parallel)
        for term in (t for t in terms if experts.expert_share(spec, setup, t.name)):
            n = split["grads" if term.name == "grads" else "optimizer" if term.name == "optimizer" else "weights"]
            share = experts.expert_share(spec, setup, term.name)
            term.bytes = int(term.bytes * experts.state_scale(spec, setup, n, share))
            divisor = experts.expert_divisor(setup, n)
            term.reason += (f"; routed experts ({share:.0%}) 1/{divisor} per rank with tp (ep {setup.parallel.ep}, "
                            f"etp {setup.parallel.etp})")
    if fraction < 1:  # tp x pp: this rank's share of every weight, gradient and optimizer state
        for term in terms:
            term.bytes = int(term.bytes * fraction)
            term.reason += f"; this {stage}-stage tp x pp rank holds {fraction:.3%} of the model"
    paged = page_optimizer_states(spec, setup, terms)
    activations = layout.layout_activation_bytes(spec, setup, stage)  # the search's costliest term: once a stage
    terms += step_terms(spec, setup, trainable * fraction / split["optimizer"], world, stage, activations)
    breakdown = peak_breakdown(spec, setup, terms, trainable, world, stage, backward_activations=activations[1])
    return dataclasses.replace(breakdown, paged_bytes=paged)


def model_state_terms(spec: ModelSpec, setup: TrainSetup, trainable: int, split: dict[str, int],
                      group: int) -> list[Term]:
    """Frozen base (LoRA / QLoRA), trained weights, gradients and optimizer states, per rank."""
    P, lora, deepspeed = spec.num_params, setup.trains_adapters, setup.is_deepspeed
    per_rank = {name: f", 1/{group} per rank" if n > 1 else "" for name, n in split.items()}
    # FSDP2's CPUOffloadPolicy keeps every sharded parameter (frozen or not) in host memory.
    fsdp_offload = setup.is_fsdp and setup.offloads
    on_host = ", in host memory (FSDP2 CPUOffloadPolicy); gathered layer by layer (comm buffers)" if fsdp_offload else ""
    terms = []
    if setup.method == "qlora":
        terms.append(Term("frozen_weights", 0 if fsdp_offload else int(sizes.qlora_base_bytes(spec) / split["weights"]),
                          "QLoRA base: block linears in nf4 + double quant, the rest (embeddings, norms, head) in bf16"
                          + (f", 1/{group} per rank (bf16 quant storage shards like any weight)" if per_rank["weights"]
                             else "") + on_host))
    elif lora:
        base = int(P * sizes.bytes_per_weight(setup.precision) / split["weights"])
        terms.append(Term("frozen_weights", 0 if fsdp_offload else base,
                          "LoRA base: every pretrained weight, frozen, in the weight dtype" + on_host))
    weight_bytes = sizes.weight_element_bytes(setup)
    if lora:
        terms.append(Term("weights", 0 if fsdp_offload else trainable * sizes.ADAPTER_BYTES,
                          "LoRA adapters: r x (in + out) per targeted linear, fp32" + on_host))
    elif setup.offload == "optimizer+params":
        terms.append(Term("weights", 0, "offloaded to CPU (ZeRO-Infinity or FSDP2 CPUOffloadPolicy); gathered layer by "
                                        "layer (comm buffers)"))
    else:
        reason = ("DeepSpeed keeps bf16/fp16 module weights" if weight_bytes == 2 and deepspeed
                  else f"{weight_bytes}-byte weights ({setup.precision})")
        terms.append(Term("weights", int(P * weight_bytes / split["weights"]), reason + per_rank["weights"]))
    grad_bytes = sizes.gradient_element_bytes(setup)
    if setup.offloads:  # ZeRO-Offload streams reduced gradients to the CPU bucket by bucket
        terms.append(Term("grads", 0, "gradients stream to the CPU optimizer (counted in the reduce bucket)"))
    elif setup.optimizer_in_backward:
        terms.append(Term("grads", sizes.largest_trainable_elements(spec, setup) * grad_bytes,
                          "optimizer step in backward: one weight's gradient at a time, stepped and freed as it is ready"))
    else:
        terms.append(Term("grads", int(trainable * grad_bytes / split["grads"]), "one gradient per trainable weight, in "
                          "its dtype" + (f", reduce-scattered to 1/{group}" if per_rank["grads"] else "")))
    terms.append(optimizer_term(spec, setup, trainable, split["optimizer"], per_rank["optimizer"]))
    return terms


def optimizer_term(spec: ModelSpec, setup: TrainSetup, trainable: int, split: int, per_rank: str) -> Term:
    state_precision = "fp32" if setup.trains_adapters else setup.precision
    deepspeed_full = setup.is_deepspeed and not setup.trains_adapters
    state_bytes, master_bytes = sizes.optimizer_bytes_per_param(setup.optimizer, state_precision, deepspeed_full,
                                                          setup.is_deepspeed)
    optimizer = (state_bytes + master_bytes) * trainable
    factored = setup.optimizer == "adafactor" and not setup.is_deepspeed
    if factored:
        optimizer += (sizes.factored_state_elements(spec, setup)
                      * sizes.state_element_bytes(state_precision, deepspeed_full))
    return Term("optimizer", 0 if setup.offloads else int(optimizer / split),
                (f"{setup.optimizer}: a row and a column of second moments per matrix" if factored
                 else f"{setup.optimizer}: {state_bytes} B/param of state")
                + (f" + {master_bytes} B fp32 master copy" if master_bytes else "") + per_rank
                + (", offloaded to CPU" if setup.offloads else ""))


def page_optimizer_states(spec: ModelSpec, setup: TrainSetup, terms: list[Term]) -> int:
    """bitsandbytes' paged optimizers keep each large tensor's states in CUDA unified memory, outside the caching
    allocator, and prefetch only the states of the tensor being stepped: when the GPU runs short the driver
    pages the others to host RAM. So the GPU must hold one tensor's states (the optimizer term becomes that
    working set); the whole returned bytes may live in host RAM (the planner charges their PCIe traffic).
    DeepSpeed's fp32 master copy is not paged, so only the torch engines' plans are treated so."""
    if setup.optimizer not in PAGED_OPTIMIZERS or setup.device != "cuda" or setup.offloads or setup.is_deepspeed:
        return 0
    term = next(t for t in terms if t.name == "optimizer")
    state_bytes, _ = sizes.optimizer_bytes_per_param(setup.optimizer, setup.precision, False, False)
    paged, term.bytes = term.bytes, min(term.bytes, sizes.largest_trainable_elements(spec, setup) * state_bytes)
    term.reason += ("; in CUDA unified memory: on the GPU here only the largest tensor's, the rest paged to host "
                    "RAM when the GPU runs short")
    return paged


def step_terms(spec: ModelSpec, setup: TrainSetup, trainable_per_rank: float, world: int, stage: str,
               activations: tuple[int, int, str]) -> list[Term]:
    """What one step adds on top of the model states: activations (memory_layout.layout_activation_bytes),
    logits and loss, weight casts, communication buffers and the optimizer's scratch."""
    tokens = layout.local_tokens(setup)
    saved, _, reason = activations
    terms = [Term("activations", saved, reason + " (norms, attention q/k/v/out, MLP, linear inputs)")]
    logit_rows = sizes.logits_tokens(setup)
    if setup.parallel.model_parallel > 1:  # tp, pp or cp: the layout's loss (ep alone leaves it as it is)
        terms.append(Term("logits_loss", layout.head_loss_bytes(spec, setup, stage),
                          "vocab-parallel loss on the last stage: the micro-batch's logits over vocab / tp, fp32 "
                          "softmax and gradient, the final norm's and head's inputs"
                          if layout.logits_share(setup, stage) else "no LM head on this pipeline stage"))
    elif logit_rows < tokens:
        # The chunked loss's own gradient of a trained LM head accumulates over the chunks beside them, and stays
        # through the final norm's backward, which follows the loss's with every activation still saved.
        head_grad = 0 if setup.trains_adapters else spec.vocab * spec.hidden * sizes.compute_mode(setup).weight_bytes
        chunk = logit_rows * spec.vocab * sizes.LOGITS_BYTES_PER_ELEMENT
        after = {"the final RMSNorm's fp32 backward": tokens * spec.hidden * sizes.FINAL_NORM_BACKWARD_BYTES,
                 "the last MoE layer's experts backward": tokens * experts.moe_layer_gradient_bytes_per_token(spec, setup)}
        later, size = max(after.items(), key=lambda item: item[1])
        what = (f"one chunk of {logit_rows} tokens' logits, recomputed in backward, with their fp32 softmax and "
                f"gradient" if chunk >= size else f"then {later}, with every activation still saved")
        terms.append(Term("logits_loss", max(chunk, size) + head_grad, f"chunked loss: {what}"
                          + (", + the LM head's gradient it accumulates" if head_grad else "")))
    else:
        terms.append(Term("logits_loss", tokens * spec.vocab * sizes.LOGITS_BYTES_PER_ELEMENT, "loss at the start of "
                          "backward: fp32 log-softmax saved, its incoming gradient and its own gradient"))
    copies = sizes.low_precision_copy_bytes(spec, setup,
                                            per_layer_only=setup.full_recompute and setup.trains_adapters)
    fraction = layout.local_param_fraction(spec, setup, stage)
    terms.append(Term("weight_copies", int(copies * fraction),
                      "bf16 casts of fp32 matmul weights that autograd keeps for backward (autocast)"))
    terms.append(communication_term(spec, setup, world, fraction, stage))
    stepped = sizes.largest_trainable_elements(spec, setup) if setup.optimizer_in_backward else trainable_per_rank
    scratch = 0 if setup.offloads else sizes.step_scratch_bytes(spec, setup, stepped, sizes.gradient_element_bytes(setup))
    terms.append(Term("optimizer_scratch", int(scratch), sizes.SCRATCH_REASONS[setup.optimizer]))
    return terms


def communication_term(spec: ModelSpec, setup: TrainSetup, world: int, fraction: float, stage: str) -> Term:
    """The data-parallel engine's buffers for this rank's share of the model (DDP's buckets hold its gradients,
    FSDP / ZeRO-3 gather its tp shard of a layer), plus sequence parallel's gathered input, the pipeline's
    in-flight stage inputs and outputs, and context parallel's K, V chunks (launcher.planning.memory_layout)."""
    data_parallel = sizes.communication_bytes(spec, setup, world)
    if setup.parallel.pure_data_parallel:
        return Term("comm_buffers", data_parallel, sizes.COMM_REASONS.get(setup.strategy, ""))
    scale = fraction if setup.is_ddp else 1 / setup.parallel.tp
    extra = (layout.tp_buffer_bytes(spec, setup) + layout.pipeline_buffer_bytes(spec, setup, stage)
             + layout.cp_buffer_bytes(spec, setup))
    return Term("comm_buffers", int(data_parallel * scale) + extra, sizes.COMM_REASONS.get(setup.strategy, "")
                + "; + the layout's gathered sequence, pipeline stage inputs and outputs in flight, ring-attention K, V buffers")


def peak_breakdown(spec: ModelSpec, setup: TrainSetup, terms: list[Term], trainable: int, world: int,
                   stage: str, backward_activations: int) -> MemoryBreakdown:
    """The model states (and DDP's buckets, allocated once at wrap time) plus the largest phase: the end of the
    forward, the backward of one layer (`backward_activations` alive, memory_layout.layout_activation_bytes), or
    the optimizer step; then the context and the allocator's slack."""
    size = {t.name: t.bytes for t in terms}
    comm, grads = size["comm_buffers"], size["grads"]
    ddp_buckets = comm if setup.is_ddp else 0
    persistent = sum(size.get(name, 0) for name in MODEL_STATES) + ddp_buckets
    transient_comm = comm - ddp_buckets
    # FSDP2 gathers parameters for forward and backward alike; only backward adds a layer's unsharded fp32
    # gradients before their reduce-scatter (counted in comm_buffers, the larger of the two).
    gradient_buffer = sizes.fsdp_gradient_buffer_bytes(spec, setup, world) // setup.parallel.tp
    forward_comm = comm - gradient_buffer if setup.is_fsdp else transient_comm
    grads_alive_in_forward = layout.grads_alive_in_forward(setup, stage)
    phase_terms = {
        "forward": {"activations": size["activations"], "logits_loss": size["logits_loss"],
                    "weight_copies": size["weight_copies"], "comm_buffers": forward_comm,
                    "grads": grads if grads_alive_in_forward else 0},
        "backward": {"grads": grads, "activations": backward_activations, "comm_buffers": transient_comm,
                     "weight_copies": 0 if setup.recomputes else size["weight_copies"]},
        "optimizer_step": {"grads": grads, "optimizer_scratch": size["optimizer_scratch"]},
    }
    phases = {name: sum(alive.values()) for name, alive in phase_terms.items()}
    phase = max(phases, key=phases.get)
    peak = persistent + phases[phase]
    if setup.device == "cpu":
        context, reason = CPU_PROCESS_BYTES, "Python + torch + transformers process (CPU run)"
    else:
        context, reason = CUDA_CONTEXT_BYTES, "CUDA context and kernel workspaces, outside the caching allocator"
    slack = int(peak * ALLOCATOR_SLACK)
    reserve = Term("context_reserve", context + slack, f"{reason} + {ALLOCATOR_SLACK:.0%} allocator slack")
    at_peak = {name: size[name] for name in MODEL_STATES if name in size}
    at_peak["comm_buffers"] = ddp_buckets
    for name, value in phase_terms[phase].items():
        at_peak[name] = at_peak.get(name, 0) + value
    at_peak["context_reserve"] = reserve.bytes
    return MemoryBreakdown(terms=[*terms, reserve], peak_bytes=peak, reserved_bytes=peak + slack + context,
                           peak_phase=phase, phases=phases, trainable_params=trainable,
                           frozen_params=spec.num_params if setup.trains_adapters else 0,
                           host_offload_bytes=sizes.host_offload_bytes(spec, setup, trainable, world), at_peak=at_peak)
