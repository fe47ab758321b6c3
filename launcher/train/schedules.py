"""Learning-rate schedules: transformers' get_scheduler for the HF names, plus step, exponential and one_cycle.

The HF names (linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, ...) go to
transformers unchanged, so they mean exactly what they mean in HF Trainer; `lr_scheduler_kwargs` (also an
HF TrainingArguments name) carries their extra arguments (num_cycles, power, lr_end) and ours:
  step         warmup, then lr * gamma ** ((step - warmup) // step_size)   kwargs: step_size, gamma (0.1)
  exponential  warmup, then lr * gamma ** (step - warmup)                  kwargs: gamma (0.999)
  one_cycle    torch's OneCycleLR: cosine up from lr/div_factor to lr over the warmup, then cosine down to
               lr/(div_factor*final_div_factor). Momentum is not cycled (AdamW's betas stay as configured).
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR

from launcher.errors import LaunchError

EXTRA_SCHEDULERS = ("step", "exponential", "one_cycle")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int,
                       kwargs: dict | None = None):
    kwargs = dict(kwargs or {})
    if name == "step":
        step_size = int(kwargs.pop("step_size", max(1, (total_steps - warmup_steps) // 3)))
        gamma = float(kwargs.pop("gamma", 0.1))
        _no_more(name, kwargs)
        if step_size < 1:
            raise LaunchError("lr_scheduler_kwargs.step_size must be at least 1.")
        return LambdaLR(optimizer, lambda s: _warmup(s, warmup_steps) if s < warmup_steps
                        else gamma ** ((s - warmup_steps) // step_size))
    if name == "exponential":
        gamma = float(kwargs.pop("gamma", 0.999))
        _no_more(name, kwargs)
        return LambdaLR(optimizer, lambda s: _warmup(s, warmup_steps) if s < warmup_steps
                        else gamma ** (s - warmup_steps))
    if name == "one_cycle":
        div_factor = float(kwargs.pop("div_factor", 25.0))
        final_div_factor = float(kwargs.pop("final_div_factor", 1e4))
        _no_more(name, kwargs)
        max_lrs = [group["lr"] for group in optimizer.param_groups]
        pct_start = max(warmup_steps, 1) / max(total_steps, 2)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=max_lrs, total_steps=max(total_steps, 2), pct_start=min(pct_start, 0.99),
            anneal_strategy="cos", cycle_momentum=False, div_factor=div_factor, final_div_factor=final_div_factor,
        )
    from transformers import get_scheduler
    from transformers.trainer_utils import SchedulerType

    # reduce_lr_on_plateau and greedy need the eval metric fed back each step; the loop steps by step count.
    known = [s.value for s in SchedulerType if s.value not in ("reduce_lr_on_plateau", "greedy")]
    known += list(EXTRA_SCHEDULERS)
    if name not in known:
        raise LaunchError(f"training.lr_scheduler_type {name!r} is not one of {', '.join(known)}.")
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                             scheduler_specific_kwargs=kwargs)
    except TypeError as err:
        raise LaunchError(f"training.lr_scheduler_kwargs does not fit {name!r}: {err}; fix the keys.") from None


def _warmup(step: int, warmup_steps: int) -> float:
    return step / max(1, warmup_steps)


def _no_more(name: str, kwargs: dict) -> None:
    if kwargs:
        raise LaunchError(f"training.lr_scheduler_kwargs has {', '.join(kwargs)}, which {name!r} does not take.")
