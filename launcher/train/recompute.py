"""Activation recompute of the decoder layers: full (each layer keeps its input) or selective (op-level SAC).

Selective is torchtitan's op-level selective activation checkpointing (torchtitan/distributed/
activation_checkpoint.py, the `_save_list` policy of its 2024-25 releases) with one change. Inside each
checkpointed layer the outputs of the attention kernels, of the tensor-parallel reduce-scatters and of every
other matmul are saved, but not the layer's last linear's (down_proj): its output only joins the residual
stream, no backward reads it and the recompute stops before it (non-reentrant checkpointing's early stop), so
torchtitan's count, which keeps it in a Llama block (whole on a row-parallel tp rank: the partial sum before its
reduction), holds 2 bytes x hidden per token and layer for nothing. Everything else (norms, rotary, SwiGLU's
activation and product, the other matmuls, the sequence-parallel all-gathers) runs again in backward from the
layer's input, so a sequence-parallel rank keeps no gathered input, as Megatron-LM's re-gather in backward does
(Korthikanti et al. 2022, sec. 4.2.2). launcher/planning/memory_layout.py counts what it keeps;
launcher/planning/memory_trace*.py trace it with this same policy.
"""
from __future__ import annotations

import functools

import torch

from launcher.planning.memory_sizes import LAYER_OUTPUT_LINEARS
from launcher.planning.parallel import SAC_SAVED_MATMUL_PARITY

# The ops whose outputs a selective layer keeps, beside every other matmul (SAC_SAVED_MATMUL_PARITY: the 1st,
# 3rd, 5th... matmul of a layer but its last: q, v and gate in a Llama block).
_ATTENTION_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                  "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)  # linears without and with a bias


def _saved_ops(also_saved: tuple) -> frozenset:
    ops = [getattr(torch.ops.aten, name).default for name in _ATTENTION_OPS if hasattr(torch.ops.aten, name)]
    return frozenset([*ops, torch.ops._c10d_functional.reduce_scatter_tensor.default, *also_saved])


class _LayerOutput:
    """Whether a layer's last linear is running: forward hooks on it set and clear the flag the policy reads
    (torch 2.13 asks the policy in forward only, and replays its answers in the recompute)."""

    def __init__(self) -> None:
        self.running = False

    def watch(self, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(lambda *_: setattr(self, "running", True))
        module.register_forward_hook(lambda *_: setattr(self, "running", False))


def selective_contexts(layer_output: _LayerOutput, saved: frozenset):
    """A fresh pair of SAC contexts for one checkpointed call: the matmuls are counted per call, so the same
    ones are saved in every layer and every step (torchtitan's per-wrapper counter drifts when a layer has an
    odd number of matmuls)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    count = [0]

    def policy(ctx, op, *args, **kwargs):
        if op in MATMULS:
            count[0] += 1
            keep = count[0] % 2 == SAC_SAVED_MATMUL_PARITY and not layer_output.running
        else:
            keep = op in saved
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def enable_recompute(net: torch.nn.Module, mode: str, also_saved: tuple = ()) -> None:
    """Non-reentrant checkpointing of every decoder layer, whole ("full") or op-level ("selective", which also
    keeps the outputs of the ops in `also_saved`: a memory trace's stand-in for the attention kernels); "none"
    leaves the model as it is. transformers 5 renamed the method (the old name still works there, with a
    FutureWarning), transformers 4 has only the old one; both pass the kwargs to torch.utils.checkpoint."""
    if mode == "none":
        return
    kwargs = {"use_reentrant": False}
    if mode == "selective":
        layer_output = _LayerOutput()
        for name, module in net.named_modules():
            if any(name.endswith("." + linear) for linear in LAYER_OUTPUT_LINEARS):
                layer_output.watch(module)
        kwargs["context_fn"] = functools.partial(selective_contexts, layer_output, _saved_ops(also_saved))
    if hasattr(net, "activation_checkpointing_enable"):
        net.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
