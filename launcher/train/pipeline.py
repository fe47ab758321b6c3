"""A Hugging Face decoder LM cut into pipeline stages at layer boundaries, under the unsplit model's names.

torchtitan splits its own decoder the same way (torchtitan/distributed/pipeline_parallel.py,
pipeline_module_split): each stage is the whole model with the modules of other stages left out, its layers
in a dict keyed by their index in the full model, so a stage's parameter names (fully-qualified names) are
the unsplit model's and its DCP state dicts reshard onto any other layout. Hugging Face's forward cannot skip
modules, so `DecoderStage` runs the decoder's own pieces (LlamaModel.forward's, which Mistral and Qwen2/3
share): the embedding on the first stage; on every stage the position ids of packed blocks, their rotary
embedding and the causal mask, computed from the hidden states it receives; the final norm and the loss on
the last (launcher.train.chunked_loss.causal_lm_loss, normalised by the window's num_items_in_batch as
without pipelining). With tensor parallelism each stage is then split over the tp ranks by the one plan
(launcher.train.tensor_parallel), as torchtitan parallelizes each model part after the split
(torchtitan/distributed/pipeline_parallel.py, pipeline_llm); the states sent between stages are each tp
rank's local slice of the sequence (sequence parallelism) or the whole states.

Stage `s` of `pp x v` runs on pipeline rank `s % pp` (torchtitan's "loop" style for interleaved 1F1B), so
the first and the last stage are always on different ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from launcher.planning.plan import PIPELINED_MODEL_TYPES  # LlamaModel.forward's pieces, a plain head
from launcher.train.chunked_loss import PLAIN_HEAD_MODEL_TYPES, causal_lm_loss
from launcher.train.modeling import decoder_layers


def stage_layers(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous layer ranges, one per stage, as even as possible; the first stages take one more."""
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for stage in range(num_stages):
        bounds.append(bounds[-1] + base + (stage < extra))
    return [range(start, stop) for start, stop in zip(bounds, bounds[1:])]


def rank_stages(pp_rank: int, pp: int, virtual: int) -> list[int]:
    """The stages pipeline rank `pp_rank` runs: pp_rank, pp_rank + pp, ... (v of them)."""
    return [pp_rank + chunk * pp for chunk in range(virtual)]


def holder(pieces: dict[str, nn.Module]) -> nn.Module:
    """A module tree that holds `pieces` under their dotted names ("model.layers.3" -> .model.layers["3"]),
    sharing the module objects: its state dict names are theirs in the model they came from."""
    root = nn.Module()
    for name, module in pieces.items():
        *path, leaf = name.split(".")
        parent = root
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.ModuleDict() if part == "layers" else nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, module)
    return root


def stage_pieces(lm: nn.Module, stage: int, num_stages: int) -> dict[str, nn.Module]:
    """The modules stage `stage` holds, by their names in the full model `lm`."""
    layers = decoder_layers(lm)
    pieces = {f"model.layers.{i}": layers[i] for i in stage_layers(len(layers), num_stages)[stage]}
    if stage == 0:
        pieces["model.embed_tokens"] = lm.model.embed_tokens
    if stage == num_stages - 1:
        pieces["model.norm"] = lm.model.norm
        pieces["lm_head"] = lm.lm_head
    return pieces


class DecoderStage(nn.Module):
    """One stage: token ids (first stage) or hidden states in, hidden states out; the last stage returns the
    micro-batch's summed token loss over num_items_in_batch. Labels go to every stage (the pipeline schedule
    hands its keyword arguments to all): every stage takes the sequence's length from them, the last its loss."""

    def __init__(self, lm: nn.Module, stage: int, num_stages: int, loss_chunk_tokens: int):
        super().__init__()
        pieces = stage_pieces(lm, stage, num_stages)
        tree = holder(pieces)
        self.model = tree.model
        if "lm_head" in pieces:
            self.lm_head = tree.lm_head
        self.rotary_emb = lm.model.rotary_emb  # buffers only (non-persistent): no name in the state dict
        self.config = lm.config
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        self.chunk = loss_chunk_tokens

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor,
                num_items_in_batch: int | None = None) -> torch.Tensor:
        if self.is_first:
            hidden = self.model.embed_tokens(hidden)
        # With sequence parallelism the states between stages are this tp rank's slice of the sequence; the
        # positions, RoPE and mask are the whole sequence's (the labels'), as the attention gathers it.
        whole = hidden.new_empty(labels.shape[0], labels.shape[1], 0)  # their shape, dtype and device
        position_ids = torch.arange(labels.shape[1], device=hidden.device).unsqueeze(0)  # packed blocks
        masks = attention_masks(self.config, whole, position_ids)
        position_embeddings = self.rotary_emb(whole, position_ids=position_ids)
        for layer in self.model.layers.values():
            hidden = layer(hidden, attention_mask=masks[getattr(layer, "attention_type", "full_attention")],
                           position_embeddings=position_embeddings, position_ids=position_ids)
        if not self.is_last:
            return hidden
        hidden = self.model.norm(hidden)
        chunk = self.chunk if self.chunk > 0 else hidden.shape[0] * hidden.shape[1]  # 0: the full logits at once
        return causal_lm_loss(hidden, self.lm_head.weight, labels, chunk, num_items_in_batch)


def attention_masks(config, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """The masks by a layer's attention_type, as the decoder's own forward builds them: Qwen2/3 name each
    layer's kind in config.layer_types; Mistral slides every layer's window when it sets one."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    args = dict(config=config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=position_ids)
    kinds = set(getattr(config, "layer_types", None) or ())
    if not kinds and getattr(config, "sliding_window", None):  # Mistral
        return {"full_attention": create_sliding_window_causal_mask(**args)}
    masks = {"full_attention": create_causal_mask(**args)}
    if "sliding_attention" in kinds:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**args)
    return masks


def can_pipeline(lm: nn.Module) -> bool:
    """A dense decoder whose pieces DecoderStage knows, with a bias-free linear head."""
    model_type = getattr(lm.config, "model_type", None)
    return model_type in PIPELINED_MODEL_TYPES and model_type in PLAIN_HEAD_MODEL_TYPES and \
        type(lm.get_output_embeddings()) is nn.Linear and lm.get_output_embeddings().bias is None


def release_other_stages(lm: nn.Module, held: set[str]) -> None:
    """Free the host memory of the layers (and untied embedding / head) this rank's stages do not hold: they
    go to the meta device. The model object stays whole for its config and for writing the final model."""
    tied = lm.lm_head.weight is lm.model.embed_tokens.weight
    for i, layer in enumerate(decoder_layers(lm)):
        if f"model.layers.{i}" not in held:
            layer.to("meta")
    for name, module in (("model.embed_tokens", lm.model.embed_tokens), ("lm_head", lm.lm_head)):
        if name not in held and not tied:
            module.to("meta")
