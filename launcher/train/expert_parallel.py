"""Expert parallelism in the ranks: a mixture of experts' routed experts split over the ep ranks, each token sent
to the rank that holds its expert and its expert's output sent back.

As torchtitan's ExpertParallel does it (torchtitan/distributed/expert_parallel.py): each fused expert weight of
transformers 5's MixtralExperts / Qwen3MoeExperts ([experts, 2 x intermediate, hidden] gate_up_proj,
[experts, hidden, intermediate] down_proj) becomes a DTensor sharded on dim 0 over the ep mesh, so a rank holds
experts / ep whole experts, and DCP saves them under the model's own names and global shapes (a checkpoint
resumes on another ep; export writes every expert). Per MoE layer and micro-batch:

1. the router, replicated and unchanged, picks each token's top-k experts; its balance loss sees this rank's
   tokens as without ep (launcher/train/chunked_loss.py), so the aux loss is EP 1's;
2. the (token, expert) pairs are sorted by expert, which groups them by the rank that holds it; the counts per
   expert go first (all_to_all_single), then the rows with those splits (all_to_all_single again, autograd
   through it: its backward is the reverse exchange);
3. the received rows, regrouped by local expert, go through one grouped GEMM per projection where torch has one
   (torch.nn.functional.grouped_mm), else a loop over the local experts;
4. the outputs return by the reverse exchange, are unsorted, weighted by the router's scores and summed per
   token, in Hugging Face's own order (transformers.integrations.moe.grouped_mm_experts_forward).

An expert weight's gradient so holds the tokens of every ep rank; FSDP2 reduces it over the ranks outside ep
(`RankMeshes.experts_dp`) with the whole data-parallel size as divisor (torchtitan's fsdp_gradient_divide_factor),
which is EP 1's mean over the data-parallel ranks (`EXPERTS_DP_NOTE` in launcher/train/engines/fsdp.py).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd, wait_tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from launcher.errors import LaunchError
from launcher.planning.plan import EP_MODEL_TYPES
from launcher.train.modeling import decoder_layers

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def routed_experts(model: nn.Module) -> list[nn.Module]:
    """Each MoE layer's fused experts module (decoder layer .mlp.experts), under PEFT's wrapper too."""
    return [layer.mlp.experts for layer in decoder_layers(model)
            if all(isinstance(getattr(getattr(layer.mlp, "experts", None), name, None), nn.Parameter)
                   for name in EXPERT_WEIGHTS)]


def shard_experts(model: nn.Module, ep: DeviceMesh) -> list[nn.Module]:
    """Split every MoE layer's experts over `ep` and route tokens to them; returns the experts modules.

    Every rank holds the same seeded weights, or meta ones that the engine fills from rank 0 afterwards, so
    each keeps its own chunk without a scatter (src_data_rank=None)."""
    model_type = getattr(model.config, "model_type", None)
    experts = routed_experts(model)
    if model_type not in EP_MODEL_TYPES or not experts:
        raise LaunchError(f"expert parallelism runs the fused experts of {', '.join(EP_MODEL_TYPES)} models, not "
                          f"{model_type}; train it with --ep 1.")
    for module in experts:
        if module.num_experts % ep.size():
            raise LaunchError(f"{module.num_experts} experts do not split over ep {ep.size()}; choose an ep that "
                              f"divides them.")
        for name in EXPERT_WEIGHTS:
            weight = getattr(module, name)
            sharded = distribute_tensor(weight.detach(), ep, [Shard(0)], src_data_rank=None)
            module.register_parameter(name, nn.Parameter(sharded, requires_grad=weight.requires_grad))
        module.ep_mesh = ep
        module.exchange_counts = exchange_counts
        module.forward = types.MethodType(expert_parallel_forward, module)
    return experts


def exchange_counts(experts: torch.Tensor, num_experts: int, ep: DeviceMesh) -> tuple[torch.Tensor, list[int], list[int]]:
    """Step 2's first exchange: how many of this rank's (token, expert) pairs go to each global expert, sent to
    the ranks that hold them. Returns the counts received, [ranks, local experts] (rows from each source rank
    for each local expert), and the rows sent to and received from each rank. The one place the dispatch reads
    the routing's values: a trace on a fake process group, which carries no data, puts its own in
    (launcher.planning.memory_trace's even routing)."""
    ranks = ep.size()
    with torch.no_grad():
        sent = torch.bincount(experts, minlength=num_experts)
        got = wait_tensor(all_to_all_single(sent, None, None, ep.get_group())).view(ranks, -1)
    return got, sent.view(ranks, -1).sum(1).tolist(), got.sum(1).tolist()


def expert_parallel_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' forward of [tokens, hidden] routed to global expert ids top_k_index [tokens, k] with
    weights top_k_weights, over the ep mesh (module docstring)."""
    tokens, top_k = top_k_index.shape
    group = self.ep_mesh.get_group()
    experts = top_k_index.reshape(-1)
    order = torch.argsort(experts, stable=True)  # pairs grouped by expert, so by the rank holding it
    got_counts, send, receive = self.exchange_counts(experts, self.num_experts, self.ep_mesh)
    rows = all_to_all_single_autograd(hidden_states[order // top_k], receive, send, group)
    rows = _local_experts(self, rows, got_counts)
    rows = all_to_all_single_autograd(rows, send, receive, group)
    weighted = rows[inverse_permutation(order)] * top_k_weights.reshape(-1, 1)
    return weighted.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def _local_experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """This rank's experts on the rows it received, laid out [source rank][local expert]: regrouped by local
    expert for the grouped GEMM (torchtitan's _permute), computed, and put back in the order they came."""
    local = counts.shape[1]
    expert_of_row = torch.arange(local, device=rows.device).repeat(counts.shape[0])
    by_expert = torch.argsort(torch.repeat_interleave(expert_of_row, counts.reshape(-1), output_size=rows.shape[0]),
                              stable=True)
    per_expert = counts.sum(0)
    gate_up, down = (getattr(self, name) for name in EXPERT_WEIGHTS)
    gate_up, down = (w.to_local() if isinstance(w, DTensor) else w for w in (gate_up, down))
    hidden = grouped_linear(rows[by_expert], gate_up, per_expert)
    gate, up = hidden.chunk(2, dim=-1)
    out = grouped_linear(self.act_fn(gate) * up, down, per_expert)
    return out[inverse_permutation(by_expert)]  # a gather saves its indices only; index_copy_ would save `out`


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """The indices that undo `order` (a permutation of 0..n-1): one scatter, where a second argsort would sort."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def grouped_linear(rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """rows [sum(counts), in] through weight [experts, out, in], counts[e] consecutive rows per expert: one
    grouped GEMM where torch has one for these tensors, else one matmul per expert."""
    weight = weight.to(rows.dtype)
    if grouped_mm_runs(rows, weight):
        return F.grouped_mm(rows, weight.transpose(-2, -1), offs=counts.cumsum(0).to(torch.int32))
    return torch.cat([F.linear(part, w) for part, w in zip(rows.split(counts.tolist()), weight)])


def grouped_mm_runs(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch.nn.functional.grouped_mm runs on CPU and, in bf16, on CUDA from SM80 (its docstring), with every
    non-unit stride a multiple of 16 bytes (the CPU kernel refuses others, as HF's _can_use_grouped_mm notes)."""
    if rows.device.type == "cuda":
        if rows.dtype != torch.bfloat16 or torch.cuda.get_device_capability(rows.device) < (8, 0):
            return False
    elif rows.device.type != "cpu":
        return False
    return all(stride * t.element_size() % 16 == 0 for t in (rows, weight) for stride in t.stride() if stride != 1)

