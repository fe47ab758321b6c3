"""The engine protocol: everything that differs between DDP, FSDP2 and DeepSpeed, and nothing else.

The loop drives an engine per optimizer step as:

    for each micro-batch:  with engine.accumulating(final=is_last):  engine.backward(engine.forward(batch).loss)
    grad_norm = engine.step(max_grad_norm)      # clip + optimizer step + zero grads

`TorchEngine` holds what the two torch-native engines share (autocast, GradScaler, clipping, DCP state).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from launcher.config import TrainingSection
from launcher.planning.plan import Plan
from launcher.train.optim import build_optimizer

AUTOCAST_DTYPES = {"amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}


class Engine(ABC):
    module: nn.Module  # the unwrapped Hugging Face model (config, generation, save_pretrained)
    optimizer: torch.optim.Optimizer  # the torch optimizer whose param_groups carry the learning rate

    @abstractmethod
    def forward(self, batch: dict):
        """The model's output for one micro-batch: its loss normalised by the batch's num_items_in_batch (and an
        MoE's weighted router aux_loss, launcher.train.chunked_loss)."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def accumulating(self, final: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-step; gradients are reduced across ranks only when `final`."""

    @abstractmethod
    def step(self, max_grad_norm: float, max_grad_value: float = 0.0) -> torch.Tensor | float:
        """Clip each element to max_grad_value, then to max_grad_norm (0: no clipping), step the optimizer,
        zero grads; return the norm before norm clipping."""

    @abstractmethod
    def save_state(self, directory: Path, async_save: bool = False):
        """Sharded model + optimizer state for resuming (every rank calls it).

        With `async_save` an engine that can returns a Future once the state is copied to host memory;
        otherwise it returns None after writing.
        """

    @abstractmethod
    def load_state(self, directory: Path) -> None: ...

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Consolidated model weights on rank 0 (every rank calls it; other ranks get {})."""

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)


class TorchEngine(Engine):
    """Shared by DDP and FSDP2: subclasses only wrap the model and say how to skip gradient sync."""

    uses_autocast = True

    def __init__(self, model: nn.Module, plan: Plan, training: TrainingSection, device: torch.device):
        self.device = device
        self.module = model
        self.wrapped = self.wrap(model, plan, device)
        self.optimizer = build_optimizer(self.module, plan.optimizer, training)
        self._grad_squares = self._step_in_backward() if plan.optimizer_in_backward else None
        dtype = AUTOCAST_DTYPES.get(plan.precision)
        self._autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype and self.uses_autocast \
            else contextlib.nullcontext
        self.scaler = self.make_grad_scaler() if plan.precision == "amp-fp16" else None

    @abstractmethod
    def wrap(self, model: nn.Module, plan: Plan, device: torch.device) -> nn.Module: ...

    def make_grad_scaler(self):
        return torch.amp.GradScaler(self.device.type)

    def forward(self, batch: dict):
        with self._autocast():
            return self.wrapped(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _step_in_backward(self) -> list[torch.Tensor]:
        """Step each trained weight as soon as its gradient is accumulated, then free that gradient, so the full
        set of gradients never exists (torchtune's optimizer_in_bwd). The one optimizer steps only parameters
        holding a gradient, and at that moment only this one does: its state dict, the LR schedule and
        checkpoints stay those of an ordinary step. Returns the list the squared gradient norms go into."""
        squares: list[torch.Tensor] = []

        def step_now(param: torch.Tensor) -> None:
            squares.append(param.grad.detach().float().pow(2).sum())
            self.optimizer.step()
            param.grad = None

        for param in self.module.parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(step_now)
        return squares

    def step(self, max_grad_norm: float, max_grad_value: float = 0.0) -> torch.Tensor:
        if self._grad_squares is not None:  # the optimizer stepped in backward; clipping is refused (launcher.jobdir.prepare)
            norm = torch.stack(self._grad_squares).sum().sqrt()
            self._grad_squares.clear()
            return norm
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.module.parameters() if p.grad is not None]
        if max_grad_value > 0:
            torch.nn.utils.clip_grad_value_(params, max_grad_value)
        norm = clip_grad_norm(params, max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save_state(self, directory: Path, async_save: bool = False):
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        if not async_save:
            dcp.save(state, checkpoint_id=str(directory))
            return None
        if getattr(self, "_checkpoint_group", None) is None:  # background writes talk over gloo, never NCCL
            self._checkpoint_group = dist.new_group(backend="gloo")
        return dcp.async_save(state, checkpoint_id=str(directory), process_group=self._checkpoint_group)

    def load_state(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if dist.get_rank() == 0 else {}


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients to a total 2-norm of at most max_norm (0: leave them); return the norm before, one
    number on every rank. FSDP2's gradients are DTensors, whose norm is reduced over their mesh; expert weights
    under expert parallelism live on another mesh than the rest, and torch neither stacks nor scales DTensors of
    two meshes together, so each mesh's gradients are reduced and scaled on their own (torchtitan's
    _clip_grad_norm_with_ep)."""
    from torch.distributed.tensor import DTensor

    by_mesh: dict = {}
    for p in params:
        by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    norms = [torch.nn.utils.get_total_norm([p.grad for p in group], 2.0) for group in by_mesh.values()]
    norms = [norm.full_tensor() if isinstance(norm, DTensor) else norm for norm in norms]
    total = (norms[0] if len(norms) == 1 else torch.stack(norms).norm(2.0)) if norms else torch.zeros(())
    for group in by_mesh.values() if max_norm > 0 else ():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
