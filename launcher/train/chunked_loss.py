"""Causal-LM cross-entropy from the final hidden states, a chunk of tokens at a time, never the full logits.

Hugging Face's loss multiplies every hidden state by the LM head, upcasts the [tokens, vocab] logits to fp32
and keeps their log-softmax for backward: for a 128k vocabulary at 2 x 2048 tokens that is ~6 GiB, more than
all checkpointed activations. `LinearCrossEntropy` computes each chunk's logits, keeps only one fp32 logsumexp
per token, and recomputes the chunk's logits in backward (torchtune's chunked output loss, Liger-Kernel's
fused linear cross-entropy, in plain PyTorch). The result is HF's `ForCausalLMLoss` (shifted labels,
ignore-index -100, sum / num_items_in_batch, else the mean over counted tokens). A mixture of experts adds its
router's load-balancing loss to the training objective here too (`router_balance_loss`).

`use_chunked_loss` puts it inside the model's own forward, so every engine's wrapper (DDP hooks, FSDP2's
unsharded root parameters, DeepSpeed ZeRO-1/2) sees an ordinary forward and backward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

IGNORE_INDEX = -100
# Architectures whose logits are exactly lm_head(last hidden state), with no softcapping or scaling: the
# others (Gemma's softcap, Granite's and Cohere's logit scales) keep their own loss.
PLAIN_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "mixtral", "qwen3_moe")
# Mixtures of experts whose router logits the decoder records, and whose config names the aux loss's weight.
ROUTED_MODEL_TYPES = ("mixtral", "qwen3_moe")


class LinearCrossEntropy(torch.autograd.Function):
    """sum over counted tokens of -log softmax(hidden @ weight.T)[target], `chunk` tokens at a time.

    The matmuls run in the autocast dtype when autocast is on (as `lm_head` would), else in the inputs'
    dtype; softmax statistics are fp32, as HF's loss upcasts. The weight's gradient accumulates in its own
    dtype, so the saving is not spent on an fp32 copy of a half-precision head."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        dtype = _matmul_dtype(hidden, weight)
        lse, picked = _chunk_statistics(hidden, weight, targets.clamp(min=0), chunk, dtype)
        counted = targets != IGNORE_INDEX
        ctx.save_for_backward(hidden, weight, targets.clamp(min=0), counted, counted, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return torch.where(counted, lse - picked, 0.0).sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return (*_chunk_gradients(ctx, grad_output), None, None)


class VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """LinearCrossEntropy through this rank's rows [start, start + rows) of a head split by vocabulary over a
    tensor-parallel group (Megatron-LM's vocab-parallel cross-entropy, chunked): each rank computes its chunks'
    logits over its rows only, and one all-gather of every token's (logsumexp, target logit) over the group
    gives the whole vocabulary's. The hidden states' gradient is this rank's rows' share of it: the caller
    declares it Partial, so DTensor sums it over the group."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, group,
                start: int) -> torch.Tensor:
        import torch.distributed as dist

        dtype = _matmul_dtype(hidden, weight)
        local = targets - start
        held = (local >= 0) & (local < weight.shape[0])  # this rank's rows hold the token's target
        index = local.clamp(0, max(0, weight.shape[0] - 1))
        lse, picked = _chunk_statistics(hidden, weight, index, chunk, dtype)
        mine = torch.stack([lse, torch.where(held, picked, 0.0)])
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, mine, group=group)
        parts = torch.stack(parts)
        lse, picked = torch.logsumexp(parts[:, 0], dim=0), parts[:, 1].sum(dim=0)
        counted = targets != IGNORE_INDEX
        ctx.save_for_backward(hidden, weight, index, counted & held, counted, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return torch.where(counted, lse - picked, 0.0).sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return (*_chunk_gradients(ctx, grad_output), None, None, None, None)


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    return (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
            else torch.promote_types(hidden.dtype, weight.dtype))


def _chunk_statistics(hidden, weight, index, chunk: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: the fp32 logsumexp of hidden @ weight.T and its logit at `index`, a chunk's logits at a time."""
    with torch.autocast(hidden.device.type, enabled=False):
        head = weight.to(dtype)
        lse = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        picked = torch.empty_like(lse)
        for start in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[start:start + chunk].to(dtype), head).float()
            lse[start:start + chunk] = torch.logsumexp(logits, dim=-1)
            picked[start:start + chunk] = logits.gather(1, index[start:start + chunk].unsqueeze(1)).squeeze(1)
    return lse, picked


def _chunk_gradients(ctx, grad_output: torch.Tensor):
    """The gradients of the summed (lse - target logit) of the counted tokens: softmax minus the target's one-hot
    (`hits`: the tokens whose target row is in `weight`), zero for tokens not counted, each chunk's logits
    recomputed."""
    hidden, weight, index, hits, counted, lse = ctx.saved_tensors
    chunk, dtype = ctx.chunk, ctx.dtype
    want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = torch.zeros_like(weight) if want_weight else None
    with torch.autocast(hidden.device.type, enabled=False):
        head = weight.to(dtype)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            inputs = hidden[rows].to(dtype)
            # d/dlogits of (logsumexp - logit[target]) = softmax - one_hot(target)
            grad = F.linear(inputs, head).float().sub_(lse[rows].unsqueeze(1)).exp_()
            grad.scatter_add_(1, index[rows].unsqueeze(1), -hits[rows].unsqueeze(1).float())
            grad.mul_((counted[rows] * grad_output).unsqueeze(1))
            grad = grad.to(dtype)
            if want_hidden:
                grad_hidden[rows] = grad @ head
            if want_weight and grad_weight.dtype == dtype:  # in place: a product then an add would hold a
                grad_weight.addmm_(grad.t(), inputs)  # second head-sized tensor
            elif want_weight:  # an fp32 head under autocast: the product in the compute dtype, half its size
                grad_weight.add_(grad.t() @ inputs)
    return grad_hidden, grad_weight


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                   num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """HF's ForCausalLMLoss on `hidden` [batch, seq, hidden] through the head `weight`, without full logits:
    position t predicts labels[t + 1]; the sum is divided by num_items_in_batch, else by the counted tokens."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    if _is_dtensor(weight):
        total = _vocab_parallel_total(hidden, weight, targets, chunk)
    else:
        total = LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets, chunk)
    if num_items_in_batch is None:
        return total / (targets != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _vocab_parallel_total(hidden: torch.Tensor, weight, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """The summed loss through a head split by vocabulary rows over a tensor-parallel mesh
    (launcher.train.tensor_parallel): the hidden states, split along the sequence or whole on each rank, are
    gathered whole (their gradient, each rank's share, sums back as a reduce-scatter or an all-reduce)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mesh = weight.device_mesh
    if not isinstance(hidden, DTensor):  # without sequence parallelism: the same whole states on every rank
        hidden = DTensor.from_local(hidden, mesh, [Replicate()], run_check=False)
    whole = hidden.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
    rows = -(-weight.shape[0] // mesh.size())  # DTensor's Shard(0) splits as torch.chunk does
    start = min(weight.shape[0], mesh.get_local_rank() * rows)
    return VocabParallelLinearCrossEntropy.apply(whole.reshape(-1, whole.shape[-1]), weight.to_local(), targets,
                                                 chunk, mesh.get_group(), start)


def router_balance_loss(config, router_logits: tuple[torch.Tensor, ...], attention_mask) -> torch.Tensor:
    """The Switch-Transformer load-balancing loss of every MoE layer's router, as Hugging Face computes it
    (num_experts x sum over experts of token fraction x mean router probability; top_k when perfectly even)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    return load_balancing_loss_func(router_logits, config.num_experts, config.num_experts_per_tok, mask)


def supports_chunked_loss(model: torch.nn.Module) -> bool:
    """A Hugging Face causal LM whose logits are a bias-free linear head over its decoder's output. A head that
    PEFT wrapped (LoRA on lm_head, modules_to_save) is no plain Linear and keeps the model's own loss."""
    head = model.get_output_embeddings()
    return (getattr(model.config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES and type(head) is torch.nn.Linear
            and head.bias is None and model.base_model is not model)


def use_chunked_loss(model: torch.nn.Module, chunk: int) -> bool:
    """Make the causal LM inside `model` (under a PEFT wrapper too) compute its training loss with
    `causal_lm_loss`; returns False, changing nothing, where the model's own loss must stay.

    The forward is replaced on the instance, so parameter names, state dicts and checkpoints are untouched and
    PEFT's wrappers, which call the inner model's forward, reach it. Without labels (generation, export) the
    model's own forward runs. A routed MoE's objective adds router_aux_loss_coef x its balance loss weighted by
    this micro-batch's share of the accumulation window's tokens (so the step's aux term is the token-weighted
    mean, whatever the accumulation); the output's aux_loss is that weighted balance loss, for logging."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if chunk <= 0 or not supports_chunked_loss(lm):
        return False
    own_forward = lm.forward

    def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None:
            return own_forward(input_ids=input_ids, **kwargs)
        for unused in ("logits_to_keep", "return_dict", "shift_labels"):
            kwargs.pop(unused, None)
        routed = self.config.model_type in ROUTED_MODEL_TYPES
        if routed:
            kwargs["output_router_logits"] = True
        outputs = self.base_model(input_ids=input_ids, **kwargs)
        loss = causal_lm_loss(outputs.last_hidden_state, self.get_output_embeddings().weight, labels, chunk,
                              num_items_in_batch)
        if not routed:
            return CausalLMOutputWithPast(loss=loss, past_key_values=outputs.past_key_values)
        share = 1.0 if num_items_in_batch is None else (labels[..., 1:] != IGNORE_INDEX).sum() / num_items_in_batch
        aux_loss = router_balance_loss(self.config, outputs.router_logits, kwargs.get("attention_mask")) * share
        if self.training:
            loss = loss + self.config.router_aux_loss_coef * aux_loss
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss)

    lm.forward = types.MethodType(forward, lm)
    return True
