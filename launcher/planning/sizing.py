"""What a model takes: the fewest of each common GPU that fit it, per fine-tuning method, and the plan chosen there.

`llaunch plan` answers this when it has no GPUs to plan for (none visible, none named by flags, a cluster
profile or the login node's SLURM partition): the question people ask before they have a machine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from launcher.planning.hardware import Hardware
from launcher.planning.models import load_model_spec
from launcher.planning.plan import METHODS, Plan, recompute_mode
from launcher.planning.planner import PlanRequest, hardware_for, make_plan, rank_candidates

COMMON_GPUS = ("H100-SXM", "H200", "A100-80GB", "A100-40GB", "L40S", "RTX-4090")
GPUS_PER_NODE = 8  # beyond one node, whole nodes of eight (HGX / DGX boards)
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class Sizing:
    """The fewest `gpu`s that fit `method`, and the plan there; plan None: nothing fit up to `tried` GPUs."""

    gpu: str
    method: str
    plan: Plan | None
    tried: int

    @property
    def gpus(self) -> int:
        return self.plan.nodes * self.plan.gpus_per_node if self.plan else 0

    def to_dict(self) -> dict:
        return {"gpu": self.gpu, "method": self.method, "gpus": self.gpus, "tried_up_to": self.tried,
                "plan": self.plan.to_dict() if self.plan else None}


def what_it_takes(request: PlanRequest, gpus: tuple[str, ...] = COMMON_GPUS,
                  methods: tuple[str, ...] = METHODS) -> list[Sizing]:
    """One row per GPU and method, in that order."""
    request.validate()
    rows = []
    for gpu in gpus:
        for method in methods:
            trial = dataclasses.replace(request, gpu=gpu, method=method)
            rows.append(Sizing(gpu, method, fewest_gpus(trial), _counts(trial)[-1]))
    return rows


def fewest_gpus(request: PlanRequest) -> Plan | None:
    """The chosen plan on the smallest GPU count where something fits in GPU memory; CPU offload (one H100 can
    hold 70B that way, at a few hundred tokens/s) only when nothing fits without it, or when asked for."""
    if request.offload is None:
        return _fewest(dataclasses.replace(request, offload="none")) or _fewest(request)
    return _fewest(request)


def _fewest(request: PlanRequest) -> Plan | None:
    """Counts are scanned with the cheapest candidates only (micro-batch 1, checkpointing on, unless forced);
    the first that fits is planned in full, as data parallelism: what `llaunch run` takes."""
    spec = load_model_spec(request.model, request.model_overrides)
    request = dataclasses.replace(request, runnable_only=True)
    smallest = dataclasses.replace(
        request, micro_batch=request.micro_batch or 1,
        activation_checkpointing=recompute_mode(request.activation_checkpointing) or "full")
    for count in _counts(request):
        shape = {"gpus_per_node": min(count, GPUS_PER_NODE), "nodes": max(1, count // GPUS_PER_NODE)}
        trial = dataclasses.replace(smallest, **shape)
        if any(c.fits for c in rank_candidates(spec, trial, hardware_for(trial, Hardware()))):
            return make_plan(dataclasses.replace(request, **shape), Hardware())
    return None


def _counts(request: PlanRequest) -> tuple[int, ...]:
    """DDP replicates the model: more GPUs never make it fit; a step in backward runs on one GPU only."""
    if request.strategy == "ddp" or request.optimizer_in_backward:
        return GPU_COUNTS[:1]
    return GPU_COUNTS


def memory_curves(request: PlanRequest, methods: tuple[str, ...] = METHODS) -> dict[str, dict[str, list[tuple[int, int]]]]:
    """Per method and strategy, the smallest reserved bytes per GPU (micro-batch 1, checkpointing on, no offload)
    at each GPU count: where a curve crosses a card's memory is what that card takes."""
    spec = load_model_spec(request.model, request.model_overrides)
    curves: dict[str, dict[str, list[tuple[int, int]]]] = {}
    for method in methods:
        smallest = dataclasses.replace(request, method=method, gpu=COMMON_GPUS[0], micro_batch=request.micro_batch or 1,
                                       activation_checkpointing="full", offload="none", strategy=None,
                                       runnable_only=True)
        by_strategy: dict[str, list[tuple[int, int]]] = {}
        for count in GPU_COUNTS:
            trial = dataclasses.replace(smallest, gpus_per_node=min(count, GPUS_PER_NODE),
                                        nodes=max(1, count // GPUS_PER_NODE))
            for c in rank_candidates(spec, trial, hardware_for(trial, Hardware())):
                by_strategy.setdefault(c.setup.strategy, []).append((count, c.memory.reserved_bytes))
        curves[method] = by_strategy
    return curves
