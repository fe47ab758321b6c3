"""The engine protocol: everything that differs between DDP, FSDP2 and DeepSpeed, and nothing else.

The loop drives an engine per optimizer step as:

    step_loss = engine.forward_backward(micro_batches, num_items, progress)   # the accumulation window
    grad_norm = engine.step(max_grad_norm)      # clip + optimizer step + zero grads

where an engine's window is, unless it runs the window itself (a pipeline schedule does):

    for each micro-batch:  with engine.accumulating(final=is_last):  engine.backward(engine.forward(batch).loss)

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
from launcher.runtime.beacon import Phase
from launcher.train.float8 import convert_to_float8
from launcher.train.metrics import AUX_LOSS, LOSS, step_losses
from launcher.train.optim import build_optimizer

# fp8: the linears' matmuls on float8 casts (launcher.train.float8), everything around them as amp-bf16
AUTOCAST_DTYPES = {"amp-bf16": torch.bfloat16, "amp-fp16": torch.float16, "fp8": torch.bfloat16}
OLDER_OPTIMIZER_KEY = "optimizer.param_groups"  # one list of groups: a checkpoint written before flat optimizer keys


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

    def forward_backward(self, batches: list[dict], num_items: int, progress) -> torch.Tensor:
        """Forward and backward of one accumulation window's micro-batches, each normalised by the window's
        label count `num_items`; returns their summed losses (metrics.step_losses) on the device (not synced).
        `progress` (launcher.train.progress.Progress) is told when the rank computes and when it syncs."""
        step_loss = step_losses(self.device)
        for i, batch in enumerate(batches):
            final = i == len(batches) - 1
            with self.accumulating(final=final):
                progress.enter(Phase.COMPUTE)
                output = self.forward({**batch, "num_items_in_batch": num_items})
                progress.enter(Phase.SYNC if final else Phase.COMPUTE)  # gradients reduce
                self.backward(output.loss)
            step_loss[LOSS] += output.loss.detach().float()
            if getattr(output, "aux_loss", None) is not None:  # an MoE's router balance (chunked_loss)
                step_loss[AUX_LOSS] += output.aux_loss.detach().float()
        return step_loss

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ (0: measure only) over gradients that may be DTensors on different meshes."""
    total = grad_norm(params)
    scale_grads(params, max_norm, total)
    return total


@torch.no_grad()
def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The gradients' 2-norm where they may be DTensors on different meshes (FSDP2's 1-D shards beside
    (dp_shard, tp) ones): each mesh's norm is reduced over its own ranks, then combined."""
    by_mesh: dict = {}
    for param in params:
        by_mesh.setdefault(getattr(param.grad, "device_mesh", None), []).append(param.grad)
    norms = [torch.nn.utils.get_total_norm(grads) for grads in by_mesh.values()]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


@torch.no_grad()
def scale_grads(params: list[torch.Tensor], max_norm: float, total: torch.Tensor) -> None:
    """Scale the gradients whose norm is `total` to at most max_norm (0: leave them), shard by shard."""
    if max_norm <= 0:
        return
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
    for device in {g.device for g in grads}:  # FSDP2's CPU offload keeps shards and their gradients on the host
        torch._foreach_mul_([g for g in grads if g.device == device], scale.to(device))


class TorchEngine(Engine):
    """Shared by DDP and FSDP2: subclasses only wrap the model and say how to skip gradient sync."""

    uses_autocast = True

    def __init__(self, model: nn.Module, plan: Plan, training: TrainingSection, device: torch.device, meshes):
        """meshes: the ranks' launcher.train.device_mesh.RankMeshes (the loop builds them once)."""
        self.device = device
        self.module = model
        self.held = model  # the module whose parameters this rank trains, under the model's names
        self.meshes = meshes
        if plan.precision == "fp8":  # before wrapping, as torchtitan converts before parallelizing
            convert_to_float8(model)
        self.wrapped = self.wrap(model, plan, device)
        self.optimizer = build_optimizer(self.held, plan.optimizer, training)
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
        params = [p for p in self.held.parameters() if p.grad is not None]
        if max_grad_value > 0:
            torch.nn.utils.clip_grad_value_(params, max_grad_value)
        norm = self.clip_grad_norm(params, max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Scale the gradients to at most max_norm in total (0: leave them); return their norm before. An engine
        whose ranks hold different parameters (pipeline stages) sums the norm over them."""
        return clip_grad_norm(params, max_norm)

    def state_dicts(self, flat: bool = True) -> dict:
        """{"model", "optimizer"} under the model's parameter names. The optimizer's is flattened (one key per
        parameter, param groups too), so ranks that hold different parameters (pipeline stages) write one
        checkpoint that any layout reads; `flat=False` reads a checkpoint of an older llaunch."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(flatten_optimizer_state_dict=flat)
        model_state, optim_state = get_state_dict(self.held, self.optimizer, options=options)
        return {"model": model_state, "optimizer": optim_state}

    def set_state_dicts(self, state: dict, flat: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(self.held, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"],
                       options=StateDictOptions(flatten_optimizer_state_dict=flat))

    def save_state(self, directory: Path, async_save: bool = False):
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        state = self.state_dicts()
        if not async_save:
            dcp.save(state, checkpoint_id=str(directory))
            return None
        if getattr(self, "_checkpoint_group", None) is None:  # background writes talk over gloo, never NCCL
            self._checkpoint_group = dist.new_group(backend="gloo")
        return dcp.async_save(state, checkpoint_id=str(directory), process_group=self._checkpoint_group)

    def load_state(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        flat = OLDER_OPTIMIZER_KEY not in dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
        state = self.state_dicts(flat)
        dcp.load(state, checkpoint_id=str(directory))
        self.set_state_dicts(state, flat)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.held, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if dist.get_rank() == 0 else {}
