"""Pipeline parallelism: the decoder's stages (launcher.train.pipeline) on the pp ranks, each stage split over
the tp ranks by the one tensor-parallel plan (launcher.train.tensor_parallel) and then under the plan's data
parallelism (DDP, or FSDP2 / HSDP) over the data-parallel ranks, run by a torch.distributed.pipelining schedule
(GPipe, 1F1B, interleaved 1F1B).

The schedule runs a whole accumulation window (its micro-batches are the pipeline's microbatches) in one
`step()`, so this engine takes the window itself (`forward_backward`). Each micro-batch's loss is already
divided by the window's label count, so the schedule sums gradients (scale_grads=False) and the gradient is
the one without pipelining. What the rest of llaunch sees stays as without pipelining:

- the loss: the last stage's, summed over the pipeline's ranks, so every rank holds its data shard's loss;
- the gradient norm: squared per rank, summed over the pipeline (torchtitan's clip_grad_norm_ with pp);
- tied embeddings: the first stage holds the embedding and the last the head, two copies of one matrix
  that start equal; after backward each copy's gradient is the sum of both (an all-reduce between the two
  ranks, Megatron-LM's embedding group; with tp each pair holds the same vocabulary rows, so their local
  shards add), so they get the same updates and stay equal. The head's copy is
  left out of the gradient norm, and its optimizer state is saved under the embedding's name, as the
  unsplit model has it;
- checkpoints: each rank's stages under the unsplit model's names, the optimizer's flattened, so a pipeline's
  checkpoint resumes without one and the other way round (DCP reshards).

Every rank builds the whole model in host memory (the same seeded init as without pipelining) and then
releases the layers its stages do not hold.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from launcher.errors import LaunchError
from launcher.planning.plan import Plan
from launcher.runtime.beacon import Phase
from launcher.planning.parallel import check_tensor_parallel
from launcher.train.engines.base import AUTOCAST_DTYPES, TorchEngine, grad_norm, scale_grads
from launcher.train.metrics import LOSS, step_losses
from launcher.train.pipeline import DecoderStage, can_pipeline, holder, rank_stages, release_other_stages, stage_pieces
from launcher.train.pipeline_stage import OnDemandReceiveStage
from launcher.train.tensor_parallel import parallelize

HEAD, EMBEDDING = "lm_head.weight.", "model.embed_tokens.weight."  # a tied head's optimizer keys, renamed


class PipelineEngine(TorchEngine):
    def __init__(self, model: nn.Module, plan: Plan, training, device: torch.device, meshes):
        self.dims = plan.parallel
        self.pp_group = meshes.pp.get_group()
        self.pp_rank = meshes.pp.get_local_rank()
        self.uses_autocast = not plan.is_fsdp  # FSDP2 casts by its MixedPrecisionPolicy; DDP's stages autocast
        super().__init__(model, plan, training, device, meshes)
        self.schedule = self._schedule()
        self.tied_group = self._tied_group()

    # ----- building ---------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, plan: Plan, device: torch.device) -> list[nn.Module]:
        if not can_pipeline(model):
            raise LaunchError(f"pipeline parallelism cuts Llama, Mistral and Qwen2/3 decoders, not "
                              f"{model.config.model_type}; train it with --pp 1.")
        num_stages = self.dims.stages
        ids = rank_stages(self.pp_rank, self.dims.pp, self.dims.pp_virtual_stages)
        pieces = {name: module for s in ids for name, module in stage_pieces(model, s, num_stages).items()}
        self.tied = model.lm_head.weight is model.model.embed_tokens.weight
        self.held = holder(pieces)
        release_other_stages(model, set(pieces))
        stages = [DecoderStage(model, s, num_stages, plan.loss_chunk_tokens) for s in ids]
        if plan.parallel.tp_enabled:  # each stage split over the tp ranks, then over the data-parallel ones
            check_tensor_parallel(model.config.model_type, model.config.num_attention_heads,
                                  model.config.num_key_value_heads, plan.parallel.tp)
            for stage in stages:
                parallelize(stage, self.meshes.tp, plan.parallel.sequence_parallel)
        wrapped = [self._data_parallel(stage, plan, device) for stage in stages]
        self.stages = [OnDemandReceiveStage(module, s, num_stages, device, group=self.pp_group)
                       for module, s in zip(wrapped, ids)]
        return wrapped

    def _data_parallel(self, stage: nn.Module, plan: Plan, device: torch.device) -> nn.Module:
        """The stage sharded (FSDP2, HSDP) or replicated (DDP: FSDP2's `replicate`, which the pipeline stages
        reduce gradients for; torch's DistributedDataParallel cannot take their backward by microbatch) over
        the data-parallel ranks, layer by layer. FSDP keeps a stage's weights gathered from a microbatch's
        forward to its backward (torchtitan does with pp)."""
        from torch.distributed._composable.replicate_with_fsdp import replicate
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        stage.to(device)
        if self.meshes.data_ranks == 1 and not plan.is_fsdp:
            return stage
        compute = AUTOCAST_DTYPES.get(plan.precision)
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)
        if plan.is_fsdp:
            wrap = partial(fully_shard, mesh=self.meshes.fsdp, mp_policy=policy, reshard_after_forward=False)
        else:
            wrap = partial(replicate, mesh=self.meshes["dp_cp"])
        for layer in stage.model.layers.values():
            wrap(layer)
        return wrap(stage)

    def _schedule(self):
        from torch.distributed import pipelining

        kind = {"gpipe": pipelining.ScheduleGPipe, "1f1b": pipelining.Schedule1F1B,
                "interleaved-1f1b": pipelining.ScheduleInterleaved1F1B}[self.dims.pp_schedule]
        stages = self.stages if self.dims.pp_schedule == "interleaved-1f1b" else self.stages[0]
        # The last stage's output is its micro-batch's loss already (computed inside the stage, where FSDP has
        # the head's weight gathered); the schedule's target is only there to satisfy its protocol.
        return kind(stages, n_microbatches=self.dims.pp_microbatches, loss_fn=lambda loss, _target: loss,
                    scale_grads=False)

    def _tied_group(self):
        """Each pipeline's (first, last) pair of ranks, for a tied embedding's gradient; None when untied."""
        if not self.tied:
            return None
        pipelines = self.meshes.world.mesh.reshape(self.dims.pp, -1).T.tolist()
        group, _ = dist.new_subgroups_by_enumeration([[ranks[0], ranks[-1]] for ranks in pipelines])
        return group

    # ----- one step ---------------------------------------------------------------------------------
    def accumulating(self, final: bool):
        """Not used: the schedule reduces the gradients after the window's last backward itself."""
        return contextlib.nullcontext()

    def forward_backward(self, batches: list[dict], num_items: int, progress) -> torch.Tensor:
        progress.enter(Phase.COMPUTE)
        inputs = torch.cat([batch["input_ids"] for batch in batches])
        labels = torch.cat([batch["labels"] for batch in batches])
        losses: list[torch.Tensor] = []
        first = (inputs,) if self.stages[0].is_first else ()
        with self._autocast():
            self.schedule.step(*first, target=labels, losses=losses, return_outputs=False, labels=labels,
                               num_items_in_batch=num_items)
        progress.enter(Phase.SYNC)
        self._sum_tied_gradients()
        step_loss = step_losses(self.device)
        if losses:
            step_loss[LOSS] = torch.stack(losses).detach().float().sum()
        dist.all_reduce(step_loss, group=self.pp_group)  # from the last stage to every rank of its pipeline
        return step_loss

    def _tied_weights(self) -> list[torch.Tensor]:
        model = self.held
        return [module.weight for module in (getattr(getattr(model, "model", None), "embed_tokens", None),
                                             getattr(model, "lm_head", None)) if module is not None]

    def _sum_tied_gradients(self) -> None:
        if self.tied_group is None:
            return
        for weight in self._tied_weights():  # the embedding on the first stage, the head on the last
            grad = weight.grad
            dist.all_reduce(grad.to_local() if hasattr(grad, "to_local") else grad, group=self.tied_group)

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        head = getattr(self.held, "lm_head", None)
        duplicate = head.weight if self.tied and head is not None else None
        square = grad_norm([p for p in params if p is not duplicate]).pow(2)
        dist.all_reduce(square, group=self.pp_group)
        norm = square.sqrt()
        scale_grads(params, max_norm, norm)
        return norm

    # ----- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, batch: dict):
        """Evaluation's forward (training runs forward_backward): the stages one after another, each hidden
        state sent to the next stage's rank; the loss, computed on the last stage, returned on every rank."""
        hidden, labels = batch["input_ids"], batch["labels"]
        shape = (hidden.shape[0], self._received_length(hidden.shape[1]), self.module.config.hidden_size)
        pp, num_stages = self.dims.pp, self.dims.stages
        mine = {stage.stage_index: stage.submod for stage in self.stages}
        for index in sorted(mine):
            if index > 0 and (index - 1) not in mine:
                hidden = torch.empty(shape, dtype=torch.float32, device=self.device)
                dist.recv(hidden, src=dist.get_global_rank(self.pp_group, (index - 1) % pp), group=self.pp_group)
            with self._autocast():
                hidden = mine[index](hidden, labels=labels)
            if index < num_stages - 1 and (index + 1) not in mine:
                dist.send(hidden.float(), dst=dist.get_global_rank(self.pp_group, (index + 1) % pp),
                          group=self.pp_group)
        loss = hidden.detach().float() if num_stages - 1 in mine else torch.zeros((), device=self.device)
        dist.all_reduce(loss, group=self.pp_group)
        return CausalLMOutputWithPast(loss=loss)

    def _received_length(self, length: int) -> int:
        """The sequence length of the states a stage receives: this tp rank's slice with sequence parallelism
        (DTensor's Shard(1) splits as torch.chunk does), else the whole sequence."""
        if not (self.dims.tp_enabled and self.dims.sequence_parallel):
            return length
        per_rank = -(-length // self.dims.tp)
        return max(0, min(per_rank, length - self.meshes.tp.get_local_rank() * per_rank))

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)
        for stage in self.stages:
            stage.submod.train(mode)

    # ----- state ------------------------------------------------------------------------------------
    def state_dicts(self, flat: bool = True) -> dict:
        state = super().state_dicts(flat)
        if self.tied and hasattr(self.held, "lm_head"):
            state["optimizer"] = _renamed(state["optimizer"], HEAD, EMBEDDING)
        return state

    def set_state_dicts(self, state: dict, flat: bool = True) -> None:
        if self.tied and hasattr(self.held, "lm_head"):
            state = {**state, "optimizer": _renamed(state["optimizer"], EMBEDDING, HEAD)}
        super().set_state_dicts(state, flat)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every stage's weights, gathered whole by the first data-parallel rank of each stage and sent to
        rank 0 (every rank calls it; other ranks get {})."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.held, options=StateDictOptions(full_state_dict=True))
        mine = {name: tensor.detach().cpu() for name, tensor in state.items()} if self.meshes.data_rank == 0 else {}
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if not parts:
            return {}
        state = {name: tensor for part in parts for name, tensor in part.items()}
        if self.tied:  # the last stage's copy of the embedding: a saved model holds the matrix once
            state.pop(HEAD.rstrip("."), None)
        return state


def _renamed(state: dict, old: str, new: str) -> dict:
    """Flattened optimizer keys ("state.NAME.exp_avg", "param_groups.NAME.lr") with parameter `old` named `new`."""
    def rename(key: str) -> str:
        kind, _, rest = key.partition(".")
        return f"{kind}.{new}{rest[len(old):]}" if rest.startswith(old) else key

    return {rename(key): value for key, value in state.items()}
