"""Tensor parallelism with sequence parallelism on a Hugging Face decoder, with torch's DTensor plan.

The plan is torchtitan's parallelize_llama (torchtitan/models/llama3/infra/parallelize.py) on the HF module
names of Llama, Mistral, Qwen2 and Qwen3: q/k/v and gate/up ColwiseParallel, o and down RowwiseParallel, the
embedding row-wise by vocabulary, the LM head column-wise by vocabulary; with sequence parallelism the norms are
SequenceParallel, the residual stream between them is split along the sequence, and attention and MLP gather it
(PrepareModuleInput). Qwen3's per-head q/k norms see the heads this rank holds (torchtitan's
SequenceParallel(sequence_dim=2)). Every weight becomes a DTensor under its own name, so FSDP2 composes on the
2-D (dp_shard, tp) mesh and DCP saves the model-global tensors.

Why not transformers' own `base_model_tp_plan`: it names the same column / row splits but has no sequence
parallelism (its norms stay replicated), its LM head gathers the whole vocabulary's logits ("colwise_gather_output"),
and it is applied by `from_pretrained(tp_plan=...)` while loading, whereas the FSDP engine builds the model on rank 0
only and fills the other ranks' shards by broadcast. The plan below keeps its column / row choices.

One difference from torchtitan: the embedding's output stays whole (an all-reduce, not a reduce-scatter) and the
first decoder layer splits it along the sequence (a local slice), because HF's decoder derives the positions,
RoPE and the causal mask from the embedding's output length. The loss reads the LM head's weight shard directly
(launcher.train.chunked_loss: vocab-parallel and chunked), so the head's own forward runs only without labels.
"""

from __future__ import annotations

from torch import nn

def parallelize(model: nn.Module, mesh, sequence_parallel: bool, *, sharded_logits: bool = False) -> None:
    """Apply the plan in place on `mesh` (1-D, tp) to a causal LM or to one pipeline stage of it
    (launcher.train.pipeline.DecoderStage: the same names, its layers in a dict keyed by their index in the
    model, the embedding and the head only where the stage holds them). Each rank keeps its own slice of the
    weights it holds (src_data_rank=None): rank 0 of an FSDP job holds the real ones, the others meta tensors
    filled later. `sharded_logits` leaves the head's logits split by vocabulary (the memory trace's loss), else
    gathered."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    residual = Shard(1) if sequence_parallel else Replicate()
    inner, plan = model.model, {}
    embedding, head = getattr(inner, "embed_tokens", None), getattr(model, "lm_head", None)
    layers = inner.layers.values() if isinstance(inner.layers, nn.ModuleDict) else inner.layers
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    if embedding is not None:
        plan["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if head is not None:
        if sequence_parallel:
            plan["model.norm"] = SequenceParallel()
        plan["lm_head"] = ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1) if sharded_logits
                                          else Replicate(), use_local_output=not sharded_logits)
    parallelize_module(model, mesh, plan, src_data_rank=None)
    if tied:  # torchtitan ties after parallelizing; both are split by vocabulary rows (Shard(0))
        model.lm_head.weight = inner.embed_tokens.weight
    for layer in layers:
        parallelize_module(layer, mesh, layer_plan(layer, sequence_parallel), src_data_rank=None)
    if sequence_parallel and embedding is not None:  # the first layer slices the embedding's output
        split = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                   use_local_output=True)
        parallelize_module(next(iter(layers)), mesh, split)


def layer_plan(layer: nn.Module, sequence_parallel: bool) -> dict:
    """One decoder layer's styles."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)

    residual = Shard(1) if sequence_parallel else Replicate()
    block = {f"self_attn.{n}": ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj")}
    block |= {f"mlp.{n}": ColwiseParallel() for n in ("gate_proj", "up_proj")}
    block |= {"self_attn.o_proj": RowwiseParallel(output_layouts=residual),
              "mlp.down_proj": RowwiseParallel(output_layouts=residual)}
    if getattr(layer.self_attn, "q_norm", None) is not None:  # Qwen3: RMSNorm over each head this rank holds
        block |= {f"self_attn.{n}": SequenceParallel(sequence_dim=2, use_local_output=True)
                  for n in ("q_norm", "k_norm")}
    if sequence_parallel:
        # The decoder layer passes hidden_states to self_attn by keyword, to the MLP by position.
        block |= {"input_layernorm": SequenceParallel(), "post_attention_layernorm": SequenceParallel(),
                  "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                                  desired_input_kwarg_layouts={"hidden_states": Replicate()}),
                  "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))}
    return block
