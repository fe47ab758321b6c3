"""Activation recompute of the decoder layers: full (each layer keeps its input) or selective (op-level SAC).

Selective is torchtitan's op-level selective activation checkpointing (torchtitan/distributed/
activation_checkpoint.py, the `_save_list` policy of its 2024-25 releases): inside each checkpointed layer the
outputs of the attention kernels, of the tensor-parallel reduce-scatters and of every other matmul are saved,
and everything else (norms, rotary, SwiGLU's activation and product, the other matmuls, the sequence-parallel
all-gathers) runs again in backward from the layer's input. It costs about half a layer's matmuls again where
full recompute costs the whole forward, and it keeps a sequence-parallel rank's gathered inputs out of memory,
as Megatron-LM's re-gather in backward does (Korthikanti et al. 2022, sec. 4.2.2). launcher/planning/
memory_layout.py counts what it keeps; launcher/planning/memory_trace*.py trace it with this same policy.
"""

from __future__ import annotations

import torch

from launcher.planning.parallel import SAC_SAVED_MATMUL_PARITY

# The ops whose outputs a selective layer keeps; every other matmul is recomputed (SAC_SAVED_MATMUL_PARITY:
# the 1st, 3rd, 5th... matmul of a layer is saved: q, v, gate and down in a Llama block).
_ATTENTION_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                  "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)  # linears without and with a bias


def _saved_ops() -> frozenset:
    ops = [getattr(torch.ops.aten, name).default for name in _ATTENTION_OPS if hasattr(torch.ops.aten, name)]
    ops.append(torch.ops._c10d_functional.reduce_scatter_tensor.default)
    return frozenset(ops + extra_saved_ops())


def extra_saved_ops() -> list:
    """Ops a memory trace stands in for the attention kernels with (launcher.planning.memory_trace), saved alike."""
    op = getattr(getattr(torch.ops, "llaunch", None), "flash_memory", None)
    return [op.default] if op is not None and hasattr(op, "default") else []


def selective_contexts():
    """A fresh pair of SAC contexts for one checkpointed call: the matmuls are counted per call, so the same
    ones are saved in every layer and every step (torchtitan's per-wrapper counter drifts when a layer has an
    odd number of matmuls)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved, counts = _saved_ops(), {False: 0, True: 0}

    def policy(ctx, op, *args, **kwargs):
        if op in MATMULS:
            counts[ctx.is_recompute] += 1
            keep = counts[ctx.is_recompute] % 2 == SAC_SAVED_MATMUL_PARITY
        else:
            keep = op in saved
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def enable_recompute(net: torch.nn.Module, mode: str) -> None:
    """Non-reentrant checkpointing of every decoder layer, whole ("full") or op-level ("selective"); "none"
    leaves the model as it is. transformers 5 renamed the method (the old name still works there, with a
    FutureWarning), transformers 4 has only the old one; both pass the kwargs to torch.utils.checkpoint."""
    if mode == "none":
        return
    kwargs = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = selective_contexts
    if hasattr(net, "activation_checkpointing_enable"):
        net.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
