"""AdamW with decoupled weight decay on matrices only, and the HF learning-rate schedules.

Biases and norm weights are excluded from weight decay: decaying them pulls scales towards zero and only
hurts (GPT-3 / LLaMA practice, as in HF Trainer's get_decay_parameter_names).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from launcher.config import TrainingSection
from launcher.errors import LaunchError


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: weights that decay, and biases/norm weights that do not."""
    no_decay: set[str] = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if is_norm or name.endswith("bias"):
                no_decay.add(full)
    decay, keep = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (keep if name in no_decay else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if keep:
        groups.append({"params": keep, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, name: str, training: TrainingSection) -> torch.optim.Optimizer:
    """The optimizer `name` (the Plan's, which the planner sized; HF optim names) with training's
    hyperparameters: torch AdamW (the fused kernel when asked for); or SGD, Adafactor, bitsandbytes 8-bit
    AdamW (paged for QLoRA: optimizer state pages to host memory instead of failing on a memory spike)."""
    groups = decay_groups(model, training.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=training.learning_rate, momentum=training.adam_beta1)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=training.learning_rate, scale_parameter=False, relative_step=False)
    if name in ("adamw_bnb_8bit", "paged_adamw_8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise LaunchError(f"training.optim {name} needs bitsandbytes; pip install 'llaunch[qlora]'.") from None
        cls = bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit
        return cls(groups, lr=training.learning_rate, betas=(training.adam_beta1, training.adam_beta2),
                   eps=training.adam_epsilon)
    fused = name == "adamw_torch_fused"
    return torch.optim.AdamW(
        groups, lr=training.learning_rate, betas=(training.adam_beta1, training.adam_beta2),
        eps=training.adam_epsilon, fused=fused or None,
    )


def warmup_steps(training: TrainingSection, total_steps: int) -> int:
    if training.warmup_steps > 0:
        return training.warmup_steps
    return math.ceil(training.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, training: TrainingSection, total_steps: int):
    """transformers' get_scheduler for the HF names (they mean exactly what they mean in HF Trainer), plus
    step / exponential / one_cycle (launcher/train/schedules.py)."""
    from launcher.train.schedules import build_lr_scheduler

    return build_lr_scheduler(optimizer, training.lr_scheduler_type, warmup_steps(training, total_steps),
                              total_steps, training.lr_scheduler_kwargs)
