"""DeepSpeed ZeRO-1/2/3 (with optional CPU offload): the DeepSpeed engine does sharding, precision and clipping.

DeepSpeed counts micro-steps itself and reduces gradients only at its accumulation boundary, so the
engine is told the plan's accumulation and must see `step()` after every backward.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ds_configs import render_ds_config
from launcher.config import TrainingSection
from launcher.planning.plan import Plan
from launcher.train.engines.base import Engine
from launcher.train.optim import build_optimizer, decay_groups

STATE_TAG = "state"


@contextlib.contextmanager
def zero3_construction(plan: Plan, training: TrainingSection, hidden_size: int, overrides: dict):
    """While it is open, transformers builds (and loads) models inside deepspeed.zero.Init: it looks for a live
    HfDeepSpeedConfig, and partitions each module as soon as it is constructed."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    deepspeed.init_distributed()  # adopts torchrun's process group, so zero.Init's config sees the world size
    # transformers holds only a weak reference to it: this name keeps it alive while the context is open.
    live = HfDeepSpeedConfig(render_ds_config(plan, training, hidden_size, overrides))
    try:
        yield live
    finally:
        unset_hf_deepspeed_config()


class DeepSpeedEngine(Engine):
    def __init__(self, model: nn.Module, plan: Plan, training: TrainingSection, device: torch.device,
                 overrides: dict):
        import deepspeed

        self.device = device
        self.stage = plan.zero_stage
        self.config = render_ds_config(plan, training, model.config.hidden_size, overrides)
        if "optimizer" in self.config:  # offload: DeepSpeed's CPU Adam, built from the config
            client_optimizer, params = None, decay_groups(model, training.weight_decay)
        else:
            client_optimizer, params = build_optimizer(model, plan.optimizer, training), None
        self.engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=client_optimizer, model_parameters=params, config=self.config,
        )
        self.module = self.engine.module
        # The torch optimizer whose param_groups DeepSpeed's wrapper steps with (the loop's scheduler drives it).
        self.optimizer = client_optimizer or getattr(ds_optimizer, "optimizer", ds_optimizer)

    def forward(self, batch: dict):
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        # num_items_in_batch already normalises over the whole accumulation window.
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only advances DeepSpeed's micro-step counter

    def accumulating(self, final: bool):
        return contextlib.nullcontext()

    def step(self, max_grad_norm: float, max_grad_value: float = 0.0) -> torch.Tensor | float:
        # max_grad_value is refused for ZeRO before launch (launcher.jobdir.prepare); the norm comes from the config.
        self.engine.step()  # clips to gradient_clipping from the config, steps, zeroes grads
        norm = self.engine.get_global_grad_norm()  # left on the device: the loop reads it at logging steps
        return norm if norm is not None else float("nan")

    def save_state(self, directory: Path, async_save: bool = False) -> None:
        self.engine.save_checkpoint(str(directory), tag=STATE_TAG)  # synchronous: DeepSpeed writes its own files

    def load_state(self, directory: Path) -> None:
        self.engine.load_checkpoint(str(directory), tag=STATE_TAG, load_optimizer_states=True,
                                    load_lr_scheduler_states=False)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # gathers shards to rank 0
        else:
            state = self.module.state_dict()
        if dist.get_rank() != 0:
            return {}
        return {k: v.detach().cpu() for k, v in state.items()}
