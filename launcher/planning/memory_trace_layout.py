"""`llaunch plan --trace` for a tensor / pipeline / context parallel layout: one rank's peak, traced on fake tensors.

As launcher/planning/memory_trace.py does for FSDP, a fake process group (backend "fake") at the layout's world size
makes every collective a no-op of the right shape, and the HF model is built on the meta device, cut in depth.
Tensor parallel is the ranks' own DTensor plan (launcher.train.tensor_parallel.parallelize, torchtitan's
parallelize_llama on the HF names): q/k/v/gate/up ColwiseParallel, o/down RowwiseParallel, the embedding
row-wise by vocabulary, the LM head column-wise with its logits left split by vocabulary, and with sequence
parallel the norms SequenceParallel and the residual stream split along the sequence. A pipeline stage is the cut model's first stage (embedding
and its layers) or last stage (its layers, final norm, LM head and loss), stepped in the schedule's order:
as many forwards as it keeps in flight there (launcher.planning.memory_layout.inflight_microbatches), then one backward
(with the gradient a next stage would send) and one forward at a time, then the last backwards. The first
stage's input is tokens, a later stage's a received hidden-state buffer, held from its receive to its backward;
as the ranks' stages do (launcher.train.pipeline_stage), the next input is received ahead of each backward and
the output gradient just before it. Under context parallel the rank's tokens are s / cp of the sequence and
its attention is torch's ring over the cp ranks (launcher/planning/memory_trace_ring.py). MemTracker gives the
rank's peak.

LOSS_PARALLEL_TRACE: torch's loss_parallel runs the log-softmax and its backward through DTensor's sharding
propagation, which on fake tensors allocates global-shaped (tokens x whole vocabulary) fp32 tensors that
MemTracker counts (1000 MiB at tp 2, 4 and 8 alike for 4096 tokens x 32000) and no GPU rank ever holds. The trace
therefore computes the loss on the rank's local vocab / t logits: the same tensors per element as the
vocab-parallel loss (its max and sum all-reduces are one number per token).
"""

from __future__ import annotations

import math

from launcher.errors import LaunchError
from launcher.planning.memory_layout import inflight_microbatches, local_tokens, rank_layers
from launcher.planning.models import ModelSpec
from launcher.planning.plan import TrainSetup


def check_traceable(setup: TrainSetup) -> None:
    """What this trace builds: tp, pp (1F1B / GPipe) and cp of full fine-tuning in one replica; LaunchError
    names the first thing outside that, and what to do."""
    dims = setup.parallel
    refusals = (
        (dims.cp_enabled and setup.activation_checkpointing == "selective",
         "--trace of cp recomputes none or all of a layer (its ring attention is no single op that selective "
         "recompute could keep); trace with --activation-checkpointing none or full."),
        (dims.ep_enabled, "--trace traces ep under FSDP without tp or pp, as the ranks run it; drop --trace, or plan "
                          "with --ep 1."),
        (dims.dp > 1, f"the layout trace builds one tp x pp x cp replica without a data-parallel dimension; trace "
                      f"it at tp x pp x cp = {dims.model_parallel} ranks."),
        (dims.pp_enabled and dims.pp_schedule == "interleaved-1f1b",
         "--trace cannot step interleaved 1F1B (a fractional number of microbatches in flight); plan with "
         "--pp-schedule 1f1b or gpipe, or drop --trace."),
        (setup.method != "full", "--trace of a tp / pp layout traces full fine-tuning only; drop --trace for "
                                 "LoRA and QLoRA."),
    )
    for refused, sentence in refusals:
        if refused:
            raise LaunchError(sentence)


def trace_layout_peak(spec: ModelSpec, setup: TrainSetup, stage: str) -> tuple[int, dict[int, int]]:
    """The stage's peak at its full local depth, scaled linearly from 1 and 2 layers, and the traced peaks."""
    by_depth = {d: traced_layout_peak(spec, setup, d, stage) for d in (1, 2)}
    dims = setup.parallel
    local = rank_layers(spec, dims)[0 if stage == "first" else -1] if dims.pp_enabled else spec.layers
    return int(by_depth[1] + (local - 1) * (by_depth[2] - by_depth[1])), by_depth


def traced_layout_peak(spec: ModelSpec, setup: TrainSetup, layers: int, stage: str) -> int:
    """Peak bytes of one tp rank of `stage` with `layers` decoder layers over two optimizer steps of the
    schedule's microbatches (pipeline_step), on a fake process group of the layout's size."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from launcher.planning.memory_trace import _meta_model, traced_optimizer
    from launcher.planning.memory_trace_ring import register_traced_ring_attention
    from launcher.train.tensor_parallel import parallelize

    check_traceable(setup)
    if dist.is_initialized():  # a real job's process group: never replace it with a fake one
        raise LaunchError("--trace of a layout runs on a fake process group and cannot run inside a distributed job.")
    dims = setup.parallel
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=setup.world_size)
    try:
        mesh = init_device_mesh("cpu", (dims.pp, dims.cp, dims.tp), mesh_dim_names=("pp", "cp", "tp"))
        attention = register_traced_ring_attention(mesh["cp"].get_group()) if dims.cp_enabled else ""
        model = cut_stage(_meta_model(spec, setup, layers, attention), setup, stage)
        if dims.tp_enabled:  # the ranks' own plan, the head's logits left split (LOSS_PARALLEL_TRACE)
            parallelize(model, mesh["tp"], dims.sequence_parallel, sharded_logits=True)
        with FakeTensorMode(allow_non_fake_inputs=True):  # the meta weights become fake CPU tensors here
            model.to_empty(device="cpu")
            optimizer = traced_optimizer(setup.optimizer, list(model.parameters()), dtensors=dims.tp_enabled)
            # One step untracked first: DTensor caches each op's sharding, and before that its propagation runs
            # global-shaped fake ops that MemTracker would count (+150 MiB at tp 8 for TinyLlama) and no GPU holds.
            _step(model, setup, stage, optimizer, None)
            tracker = MemTracker()
            tracker.track_external(model, optimizer)
            with tracker:
                for _ in range(2):  # steady state: optimizer states exist, then the step repeats
                    _step(model, setup, stage, optimizer, tracker)
            return max(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())
    finally:
        dist.destroy_process_group()


def _step(model, setup: TrainSetup, stage: str, optimizer, tracker) -> None:
    pipeline_step(model, setup, stage, tracker)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if tracker is not None:
        tracker.reset_mod_stats()


def cut_stage(model, setup: TrainSetup, stage: str):
    """Keep what `stage` holds: the embedding on the first stage, the final norm and LM head on the last."""
    import torch

    if setup.parallel.pp_enabled and stage != "first":
        model.model.embed_tokens = None
    if setup.parallel.pp_enabled and stage != "last":
        model.model.norm, model.lm_head = torch.nn.Identity(), None
    return model


def pipeline_step(model, setup: TrainSetup, stage: str, tracker) -> None:
    """The schedule's order on this stage: as many forwards as it keeps in flight, then one backward and one
    forward at a time (1F1B's steady state, where earlier microbatches' gradients are alive), then the last
    backwards; GPipe keeps all microbatches in flight, so all forwards, then all backwards. As the ranks' stages
    do (launcher.train.pipeline_stage.OnDemandReceiveStage), a stage after the first holds each microbatch's
    received input from its receive to its backward and receives the next one ahead of each backward, and one
    before the last receives each output gradient just before its backward. MemTracker allows a module one
    forward per iteration, so its per-module statistics restart with each microbatch (its peak stays)."""
    import torch

    dims = setup.parallel
    last = stage == "last" or not dims.pp_enabled
    receives = dims.pp_enabled and stage != "first"
    total = dims.pp_microbatches if dims.pp_enabled else 1
    inflight = math.ceil(inflight_microbatches(setup, stage))
    tokens = local_tokens(setup) // setup.micro_batch
    shape = (setup.micro_batch, tokens // dims.tp if dims.sequence_parallel else tokens, model.config.hidden_size)
    dtype = next(model.model.layers.parameters()).dtype

    def receive():
        return torch.empty(shape, dtype=dtype, requires_grad=True) if receives else None

    def forward(received):
        if tracker is not None:
            tracker.reset_mod_stats()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setup.mixed_precision):
            return stage_forward(model, setup, received), received

    in_flight = [forward(receive()) for _ in range(inflight)]  # (output, input) kept for the backward
    for done in range(total):
        more = done + inflight < total
        ahead = receive() if more else None
        gradient = None if last else torch.empty(shape, dtype=dtype)  # the next stage's, received
        output, received = in_flight.pop(0)
        torch.autograd.backward(output, gradient)
        if received is not None:  # its gradient is sent to the previous stage and dropped, as torch's
            received.grad = None  # stage_backward does
        del output, gradient, received
        if more:
            in_flight.append(forward(ahead))


def stage_forward(model, setup: TrainSetup, received):
    """LlamaForCausalLM's forward, layer by layer, from this stage's input (tokens on the first stage, else the
    `received` hidden states) to its output (the loss on the last). The traced attention ignores the mask (its
    memory is the GPU kernel's); positions are the whole sequence's."""
    import torch
    import torch.nn.functional as F

    inner, dims = model.model, setup.parallel
    local = local_tokens(setup) // setup.micro_batch  # context parallel: this rank's share of the sequence
    tokens = torch.randint(0, model.config.vocab_size, (setup.micro_batch, local))
    positions = torch.arange(local).unsqueeze(0)
    hidden = inner.embed_tokens(tokens) if inner.embed_tokens is not None else received
    cos_sin = inner.rotary_emb(hidden, position_ids=positions)
    for layer in inner.layers:
        hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)
    if model.lm_head is None:
        return hidden
    logits = model.lm_head(inner.norm(hidden))
    if dims.tp_enabled:  # the vocab-parallel loss on this rank's vocab / t logits (LOSS_PARALLEL_TRACE)
        logits = logits.to_local()
    return F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten() % logits.shape[-1])
