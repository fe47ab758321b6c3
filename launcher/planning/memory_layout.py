"""What a layout's model-parallel dimensions (tp with or without sequence parallel, pp, cp) do to one rank's memory.

Sources, term by term:
- Activations per layer: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", Table 2: sbh(34 + 5as/h) per layer unparallelised; sbh(10 + 24/t + 5as/(ht)) with tensor parallel
  (the 10: the norms' inputs and the two linear inputs they feed, replicated on the t ranks); sbh/t (34 + 5as/h)
  with tensor + sequence parallel, except under torch's DTensor sequence parallel the all-gathered inputs of the
  column-parallel blocks, which autograd saves whole (gathered_bytes_per_token, measured by
  launcher/planning/memory_trace_layout.py); selective recompute drops the 5as/h attention-score term; full recompute
  keeps the layer's 2sbh input. Here the 34 is launcher.planning.memory_sizes.layer_activation_bytes, counted tensor by
  tensor for the HF Llama block under SDPA / flash attention, which never stores the a x s x s scores: the
  5as/h term is absent from the start (the kernel recomputes the scores in its backward), so Korthikanti's
  selective recompute would save nothing here. Selective is therefore what torch does under that name:
  torchtitan's op-level selective activation checkpointing (torch.utils.checkpoint's SAC policy) saves the
  outputs of SDPA and of every other matmul and recomputes the rest of the layer (norms, SwiGLU, the other
  matmuls) from the layer's input.
- Pipeline: the decoder layers split over the pp x v stages as torchtitan splits them (stage_layers: the
  embedding and the LM head each count as one layer, so the first and last stages get one layer fewer, as Llama 3
  did, arXiv 2407.21783 sec. 3.3.2). Each rank holds the saved activations of the microbatches in flight on
  its stages (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
  Megatron-LM", sec. 2.2): all m under GPipe, p - r on rank r under 1F1B, and under interleaved 1F1B the
  forwards of its warm-up, 2(p - 1 - r) + (v - 1)p + 1 chunk-microbatches in torch's and Megatron-LM's order
  (Korthikanti sec. 4.2.3's p(1 + (p - 1)/(pv)) microbatches on rank 0 when every chunk has L/(pv) layers).
  "first" is the most loaded rank before the last (rank 0 under 1F1B with even stages; rank 1 once rank 0 has
  the embedding in place of a layer, or under interleaved 1F1B); the last holds the final norm, LM head and loss.
  Its stages keep each in-flight forward's output and input, and receive one input and one gradient at a time
  (pipeline_buffer_bytes); under 1F1B a stage's backward starts with all of its in-flight activations held
  (stage_backward_bytes).
- Context parallel: each rank holds s/cp tokens of every activation (Liu et al. 2023, "Ring Attention");
  torch's ring (torch.distributed.tensor.experimental.context_parallel, torchtitan's default) all-gathers K and V
  over cp for each layer's attention and accumulates its gradients in fp32 (cp_buffer_bytes).
- Mixture of experts: each MoE layer also saves its router's logits and top-k, and the dropless dispatch and
  combine buffers (launcher.planning.expert_parallel.moe_bytes_per_token).
- Vocab-parallel loss under tp: each rank holds the logits of vocab / t (Megatron-LM's vocab-parallel
  cross-entropy, torchtitan's loss_parallel).
"""

from __future__ import annotations

import functools

from launcher.planning import expert_parallel as experts
from launcher.planning import memory_sizes as sizes
from launcher.planning.models import ModelSpec
from launcher.planning.plan import TrainSetup

STAGES = ("first", "last")  # the pipeline stages whose memory differs most (one stage without pp)


def stages(setup: TrainSetup) -> tuple[str, ...]:
    """The stages whose peak must fit: the first and the last under pp, the only one without."""
    return STAGES if setup.parallel.pp_enabled else ("first",)


def local_param_fraction(spec: ModelSpec, setup: TrainSetup, stage: str) -> float:
    """The share of the model's parameters one tp x pp rank of `stage` holds: the decoder layers of its stages
    (stage_layers; "first": the most of any rank before the last, with the embedding on rank 0), the final norm
    and LM head on the last (a tied head is a second copy there), all split over tp (linears by rows or columns,
    embedding and head by vocabulary; the norms' weights, replicated under tp, are under 0.01 % of a 7B+ model
    and counted split)."""
    dims = setup.parallel
    if dims.pure_data_parallel or (dims.tp == 1 and dims.pp == 1):
        return 1.0
    if not dims.pp_enabled:
        return 1 / dims.tp
    per_layer = (spec.num_params - spec.embedding_params - spec.lm_head_params) / spec.layers
    layers = rank_layers(spec, dims)
    if stage == "last":
        local = layers[-1] * per_layer + (spec.lm_head_params or spec.embedding_params)
    else:
        local = max(layers[0] * per_layer + spec.embedding_params, max(layers[1:-1], default=0) * per_layer)
    return local / dims.tp / spec.num_params


def stage_layers(spec: ModelSpec, dims) -> tuple[int, ...]:
    """Decoder layers of each of the pp x v pipeline stages as torchtitan places them
    (torchtitan/distributed/pipeline_parallel.py, generate_llm_fqn_per_model_part with input_weight =
    output_weight = 1): the embedding and the final norm + LM head count as one layer each, the L + 2 are spread
    evenly with the remainder on the first stages. Llama 3 405B's 126 layers over 16 stages: 7, 8 x 14, 7."""
    return _split(spec.layers, dims.stages)


@functools.lru_cache(maxsize=1024)
def _split(layers: int, count: int) -> tuple[int, ...]:
    if count == 1:
        return (layers,)
    per, extra = divmod(layers + 2, count)
    split = [per + (s < extra) for s in range(count)]
    split[0] -= 1
    split[-1] -= 1
    return tuple(split)


def rank_layers(spec: ModelSpec, dims) -> list[int]:
    """Decoder layers on each pipeline rank: rank r holds stages r, r + p, ... (torchtitan's loop order)."""
    layers = stage_layers(spec, dims)
    return [sum(layers[r::dims.pp]) for r in range(dims.pp)]


def inflight_microbatches(setup: TrainSetup, stage: str) -> float:
    """Microbatches the first (rank 0) or last rank holds before its first backward, for the head's logits and
    the trace's schedule: all m under GPipe, p on rank 0 and one on the last under 1F1B, p(1 + (p-1)/(pv)) on
    rank 0 under interleaved 1F1B (Korthikanti sec. 4.2.3)."""
    dims = setup.parallel
    m, p, v = dims.pp_microbatches, dims.pp, dims.pp_virtual_stages
    if not dims.pp_enabled:
        return 1.0
    if dims.pp_schedule == "gpipe":
        return float(m)
    if stage == "last":
        return 1.0
    if dims.pp_schedule == "interleaved-1f1b":
        return min(float(m), p * (1 + (p - 1) / (p * v)))
    return float(min(m, p))


def held_layer_microbatches(spec: ModelSpec, setup: TrainSetup, stage: str) -> tuple[int, int]:
    """(layer-microbatches of saved activations at the peak, the rank that holds them): the module docstring's
    schedule rule, rank by rank over stage_layers; "first" is the most of any rank before the last."""
    dims = setup.parallel
    if not dims.pp_enabled:
        return spec.layers, 0
    ranks = [dims.pp - 1] if stage == "last" else range(dims.pp - 1)
    return max((_held(spec, dims, r), r) for r in ranks)


def _held(spec: ModelSpec, dims, rank: int) -> int:
    """Rank `rank`'s layer-microbatches before its first backward: the layers of each forward's chunk."""
    layers = stage_layers(spec, dims)
    if dims.pp_schedule == "gpipe":
        return dims.pp_microbatches * sum(layers[rank::dims.pp])
    return sum(layers[chunk * dims.pp + rank] for chunk in inflight_chunks(dims, rank))


def inflight_chunks(dims, rank: int) -> list[int]:
    """The local chunk of each forward rank `rank` runs before its first backward, in order: forward k runs chunk
    (k // p) mod v (microbatches go round by round of p, torch's Interleaved1F1B and Megatron-LM alike)."""
    return [(k // dims.pp) % dims.pp_virtual_stages for k in range(inflight_forwards(dims, rank))]


def inflight_forwards(dims, rank: int) -> int:
    """Chunk-microbatch forwards rank `rank` has run before its first backward: all m x v under GPipe,
    p - rank under 1F1B, 2(p - 1 - rank) + (v - 1)p + 1 under interleaved 1F1B (the module docstring)."""
    m, p, v = dims.pp_microbatches, dims.pp, dims.pp_virtual_stages
    if dims.pp_schedule == "gpipe":
        return m * v
    if dims.pp_schedule == "1f1b":
        return min(m, p - rank)
    return min(m * v, 2 * (p - 1 - rank) + (v - 1) * p + 1)


def pipeline_buffer_bytes(spec: ModelSpec, setup: TrainSetup, stage: str) -> int:
    """What a rank's pipeline stages hold beside the saved activations (launcher.train.pipeline_stage, which
    allocates each receive buffer when its receive is posted, where torch 2.13's PipelineStage keeps one per
    microbatch each way for the whole run): the output of each forward in flight, kept for its backward, on
    every stage before the model's last; the input of each forward in flight on the stages after the model's
    first, where the decoder does not keep it already (a checkpointed layer keeps its input; HF's RMSNorm saves
    its input itself only when that is fp32 already); and the next input received ahead of its forward and one
    output gradient being received (tests/distributed/test_pipeline_receive_buffers.py counts them). Each is one
    microbatch's hidden states in the residual stream's dtype, / t under sequence parallel."""
    dims = setup.parallel
    if not dims.pp_enabled:
        return 0
    size = local_tokens(setup) * spec.hidden * sizes.residual_bytes(setup) // (
        dims.tp if dims.sequence_parallel else 1)
    rank = held_layer_microbatches(spec, setup, stage)[1]
    p, v = dims.pp, dims.pp_virtual_stages
    chunks = inflight_chunks(dims, rank)
    outputs = len(chunks) - (chunks.count(v - 1) if rank == p - 1 else 0)  # the model's last stage ends in the loss
    inputs = len(chunks) - (chunks.count(0) if rank == 0 else 0)  # the model's first stage starts from tokens
    kept_by_decoder = setup.recomputes or sizes.compute_mode(setup) is not sizes.ComputeMode.HALF
    ahead = (v > 1 or rank > 0) + (v > 1 or rank < p - 1)  # one input, one gradient being received
    return (outputs + (0 if kept_by_decoder else inputs) + ahead) * size


def replicated_bytes_per_token(spec: ModelSpec, setup: TrainSetup) -> int:
    """Korthikanti's "10 sbh": what a layer saves outside its tp-split regions (the norms' saved inputs and
    outputs, and the norm output each column-parallel block reads), replicated on every tp rank without SP."""
    act = sizes.compute_mode(setup).act_bytes
    h = spec.hidden
    return 2 * (4 * h + sizes.residual_bytes(setup) * h) + 2 * act * h


def layer_bytes_per_token(spec: ModelSpec, setup: TrainSetup, mode: str = "") -> float:
    """One layer's saved activations per token of the local sequence on one tp rank (Korthikanti Table 2), under
    the setup's recompute mode (or `mode`: "none" for what a layer holds while it is differentiated)."""
    t, compute = setup.parallel.tp, sizes.compute_mode(setup)
    moe = experts.moe_bytes_per_token(spec, compute)
    moe_whole = experts.moe_whole_bytes_per_token(spec, compute, setup.parallel) if t > 1 else 0
    if (mode or setup.activation_checkpointing) == "selective":
        return selective_bytes_per_token(spec, setup) + moe_whole + (moe - moe_whole) / t
    per_layer = sizes.layer_activation_bytes(spec, setup) + moe
    if t == 1:
        return per_layer
    replicated = (gathered_bytes_per_token(spec, setup) if setup.parallel.sequence_parallel
                  else replicated_bytes_per_token(spec, setup))
    replicated += moe_whole
    return replicated + (per_layer - replicated) / t


def gathered_bytes_per_token(spec: ModelSpec, setup: TrainSetup) -> int:
    """Under torch's sequence parallel, what stays whole: the all-gathered norm output each column-parallel block
    reads (q/k/v's and gate/up's input). DTensor's autograd saves the Replicate input of ColwiseParallel for the
    weight gradient, where Megatron-LM keeps the 1/t shard and gathers it again in backward (Korthikanti's sbh/t).
    Traced on fake tensors at tp 2, 4 and 8 (tests/unit/test_memory_trace_layout.py): what a layer adds to the
    estimate was 5-14 % under what it adds to the trace with these tensors / t, within 1 % with them whole."""
    act = sizes.compute_mode(setup).act_bytes
    return act * spec.hidden * len(sizes.NORM_READER_GROUPS)


def selective_bytes_per_token(spec: ModelSpec, setup: TrainSetup) -> float:
    """Op-level SAC (launcher/train/recompute.py) per token on one tp rank: the layer's input, SDPA's output and
    fp32 logsumexp, and the outputs of the layer's 1st, 3rd, ... matmul but its last (q, v and gate in a Llama
    block), split over tp but for a row-parallel matmul's, whose local output is the whole partial sum before its
    reduction (none in Llama and GPT-2 blocks); with sequence parallel also each row-parallel block's
    reduce-scatter output. The rest, sequence parallel's all-gathers included, is recomputed in backward, so no
    gathered input stays whole.
    Traced on fake tensors at tp 1, 2, 4 and 8 with and without sequence parallel
    (tests/unit/test_memory_trace_layout.py)."""
    act = sizes.compute_mode(setup).act_bytes
    dims = setup.parallel
    t, sp = dims.tp, dims.tp_enabled and dims.sequence_parallel
    kept = [(name, out) for name, _, out in sizes.selective_kept_linears(spec)]
    whole = sum(act * out for name, out in kept if name in sizes.ROW_PARALLEL and t > 1)
    split = sum(act * out for name, out in kept) - whole + act * spec.heads * spec.head_dim + 4 * spec.heads
    reduced = act * spec.hidden * sum(1 for name, _, _ in spec.layer_linears if name in sizes.ROW_PARALLEL) if sp else 0
    layer_input = spec.hidden * sizes.residual_bytes(setup) / (t if sp else 1)
    return layer_input + whole + (split + reduced) / t


def local_tokens(setup: TrainSetup) -> int:
    """Tokens of one micro-batch on one rank: context parallel splits the sequence."""
    return setup.micro_batch * setup.seq_len // setup.parallel.cp


def layout_activation_bytes(spec: ModelSpec, setup: TrainSetup, stage: str) -> tuple[int, int, str]:
    """Saved activations of `stage` at the end of its forwards, those alive while one layer is differentiated,
    and why: the local layers x the microbatches in flight x each layer's bytes."""
    dims = setup.parallel
    tokens, (held, rank) = local_tokens(setup), held_layer_microbatches(spec, setup, stage)
    per_layer = layer_bytes_per_token(spec, setup)
    recompute = int(layer_bytes_per_token(spec, setup, "none") * tokens)  # one layer's tensors, in its backward
    where = (f"{held} layer-microbatches in flight on pipeline rank {rank} ({stage} stage, "
             f"{rank_layers(spec, dims)[rank]} layers)" if dims.pp_enabled else "")
    if setup.full_recompute:
        split = dims.tp if dims.tp_enabled and dims.sequence_parallel else 1
        kept = int(held * tokens * spec.hidden * sizes.residual_bytes(setup) / split)
        return kept, kept + recompute, (f"checkpointed: each layer's input kept{', ' + where if where else ''}; one "
                                        f"layer ({per_layer:.0f} B/token) recomputed in backward")
    saved = int(held * per_layer * tokens)
    if setup.activation_checkpointing == "selective":
        # A selective layer's backward runs its forward again (every tensor of it) beside the others' saved
        # outputs; its MLP's gradients take the place of the recomputed tensors they free.
        recompute += saved
    elif dims.pp_enabled and stage != "last" and dims.pp_schedule != "gpipe":
        recompute = stage_backward_bytes(spec, setup, saved)
    mode = " (tp + sequence parallel: / t)" if dims.tp_enabled and dims.sequence_parallel else (
        " (tp without sequence parallel: norms replicated)" if dims.tp_enabled else "")
    return saved, recompute, f"{per_layer:.0f} B/token/layer saved for backward{mode}{'; ' + where if where else ''}"


def stage_backward_bytes(spec: ModelSpec, setup: TrainSetup, saved: int) -> int:
    """Under 1F1B a pipeline stage before the last begins each backward at its output with every microbatch in
    flight still held (a forward follows each backward) and the gradients alive, and its last layer's MLP
    backward makes two ffn-wide gradients (of the SwiGLU product's inputs) while its incoming one is alive and
    the product it frees is one of them: 2 x tokens x ffn / t. Without it a traced 1F1B first stage was 6 % over
    the estimate (tests/unit/test_memory_trace_layout.py). GPipe's end of forwards, every microbatch held, stays
    its peak."""
    act = sizes.compute_mode(setup).act_bytes
    return int(saved + 2 * local_tokens(setup) * spec.ffn * act / setup.parallel.tp)


def cp_buffer_bytes(spec: ModelSpec, setup: TrainSetup) -> int:
    """Ring attention as torch runs it by default (torchtitan's "allgather" rotate method, Llama 3's all-gather CP):
    a layer's attention all-gathers K and V over the cp ranks once, so the whole sequence's K, V are alive through
    it, forward and backward; its backward accumulates dQ, dK and dV in fp32 (_ContextParallelOptions.convert_to_f32),
    which also merges the forward's partial outputs. Traced with torch's own ring on a fake process group
    (launcher/planning/memory_trace_ring.py, tests/unit/test_memory_trace_layout.py): counting the K, V chunk in use
    and the one arriving, as a ring that passes them rank to rank would, was 30-60 % of what the ring added."""
    if not setup.parallel.cp_enabled:
        return 0
    act = sizes.compute_mode(setup).act_bytes
    tokens, kv = local_tokens(setup), spec.kv_heads * spec.head_dim
    gathered = 2 * setup.parallel.cp * tokens * kv * act
    return gathered + 4 * tokens * (spec.heads * spec.head_dim + 2 * kv)


def tp_buffer_bytes(spec: ModelSpec, setup: TrainSetup) -> int:
    """Sequence parallel all-gathers a layer's input to the whole local sequence before each column-parallel
    block (one gathered tensor alive at a time)."""
    dims = setup.parallel
    act = sizes.compute_mode(setup).act_bytes
    return local_tokens(setup) * spec.hidden * act if dims.tp_enabled and dims.sequence_parallel else 0


def logits_share(setup: TrainSetup, stage: str) -> float:
    """The logits one rank holds: none before the last stage, vocab / t under the vocab-parallel loss."""
    if setup.parallel.pp_enabled and stage != "last":
        return 0.0
    return 1.0 / setup.parallel.tp


SAVED_LOG_SOFTMAX_BYTES = 4  # the fp32 log-softmax the loss keeps for backward, per logit


def head_loss_bytes(spec: ModelSpec, setup: TrainSetup, stage: str) -> int:
    """The last stage's LM head and loss at the start of a microbatch's backward: its logits over vocab / t
    (memory_sizes.LOGITS_BYTES_PER_ELEMENT), and what the final RMSNorm and the head save (the norm's fp32 input and
    normalized output, / t under sequence parallel; the head's input, gathered whole by ColwiseParallel). GPipe
    runs every microbatch's forward, loss included, before the first backward: the others keep their saved
    log-softmax and head inputs. Both were missing before the fake-tensor traces (test_memory_trace_layout.py):
    with them the 2-layer TinyLlama's last GPipe stage (4 microbatches) went from 31 % under the trace to
    within 3 %, tp 2-8 without sequence parallel from 3-9 % under to within 1 %."""
    share = logits_share(setup, stage)
    if not share:
        return 0
    act = sizes.compute_mode(setup).act_bytes
    split = setup.parallel.tp if setup.parallel.sequence_parallel else 1
    head_input = spec.hidden * ((4 + act) / split + act)
    inflight = inflight_microbatches(setup, stage)
    per_logit = sizes.LOGITS_BYTES_PER_ELEMENT + SAVED_LOG_SOFTMAX_BYTES * (inflight - 1)
    return int(local_tokens(setup) * (spec.vocab * share * per_logit + head_input * inflight))


def grads_alive_in_forward(setup: TrainSetup, stage: str) -> bool:
    """Accumulating, the next microbatch's forward runs on top of the gradients, except on GPipe's last stage:
    every forward there precedes the first backward, whose loss is the peak, before any gradient exists (the
    fake-tensor trace shows none at that peak; counting them put the estimate 5 % over it at tp 2 x pp 2)."""
    dims = setup.parallel
    gpipe_last = dims.pp_enabled and dims.pp_schedule == "gpipe" and stage == "last"
    return setup.gradient_accumulation_steps > 1 and not gpipe_last
