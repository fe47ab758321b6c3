"""The attention of a context-parallel layout under `llaunch plan --trace`: torch's own ring attention around the
flash-attention memory stand-in of launcher/planning/memory_trace.py, on the cp group of a fake process group.

torch's public `context_parallel` dispatches only CUDA's SDPA kernels (launcher.planning.parallel.CP_REFUSAL),
which fake CPU tensors cannot run. The ring itself takes its kernel as an argument:
torch.distributed.tensor.experimental._context_parallel._attention's `_templated_ring_attention` and
`_templated_ring_attention_backward`, which torch's CP handlers call with the CUDA flash kernels. The trace calls
them with the stand-in's shapes, under torch's defaults (torchtitan's too): K and V all-gathered over the cp
group once per layer (`_RotateMethod.ALL_GATHER`, as Llama 3 did, arXiv 2407.21783 sec. 3.3.2), the partial
outputs and logsumexps merged in fp32, dK and dV accumulated in fp32 and passed round by all-to-all, and the
causal load balancing that gives each rank chunks r and 2 cp - 1 - r of the sequence. Autograd saves what the
flash kernel's node saves: the local q, k, v, the merged output and logsumexp.

Only the shapes are real: the values of fake tensors are never computed.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor.experimental._context_parallel._attention import (
    _templated_ring_attention,
    _templated_ring_attention_backward,
)

TRACED_RING_ATTENTION = "llaunch_traced_ring"  # no "flash" in it: transformers would look for a hub kernel
SEQ_DIM = 2  # the ring's sequence dimension in SDPA's (batch, heads, tokens, dim) layout


def register_traced_ring_attention(group) -> str:
    """Register the traced ring attention over the cp process group `group` with transformers; its name."""
    from transformers import AttentionInterface

    def attention(module, query, key, value, attention_mask, **kwargs):
        return RingAttention.apply(query, key, value, group), None

    AttentionInterface.register(TRACED_RING_ATTENTION, attention)
    return TRACED_RING_ATTENTION


class RingAttention(torch.autograd.Function):
    """Causal ring attention of the local q [batch, heads, tokens / cp, dim] against every rank's k, v (at their
    own head count: flash attention's GQA); the output laid out as o_proj reads it, [batch, tokens / cp, heads, dim]."""

    @staticmethod
    def forward(ctx, query, key, value, group):
        out, lse = _templated_ring_attention(group, SEQ_DIM, _flash_forward, query, key, value, is_causal=True)
        ctx.group = group
        ctx.save_for_backward(query, key, value, out, lse)
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad):
        query, key, value, out, lse = ctx.saved_tensors
        grads = _templated_ring_attention_backward(ctx.group, SEQ_DIM, _flash_backward, grad.transpose(1, 2),
                                                   "grad_out", query, key, value, out, lse, is_causal=True)
        return *grads[:3], None


def _flash_forward(query, key, value, is_causal, **kwargs):
    """One ring step's kernel: the flash kernel's output and fp32 logsumexp for these queries."""
    batch, heads, tokens, _ = query.shape
    return torch.empty_like(query), query.new_empty(batch, heads, tokens, dtype=torch.float32)


def _flash_backward(query, key, value, out, logsumexp, is_causal, **kwargs):
    """One ring step's backward kernel: the gradients of its q, k and v."""
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
