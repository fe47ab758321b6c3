"""Weight decay skips biases and norms; schedules follow HF's formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from launcher.config import TrainingSection
from launcher.train.optim import build_optimizer, build_scheduler, decay_groups


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


class LlamaRMSNorm(nn.Module):  # named like HF's: matched by class name, not by type
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))


def test_biases_and_norm_weights_do_not_decay():
    model = Block()
    model.rms = LlamaRMSNorm()
    decay, keep = decay_groups(model, 0.1)
    ids = lambda params: {id(p) for p in params}
    assert ids(decay["params"]) == ids([model.embed.weight, model.proj.weight])
    assert ids(keep["params"]) == ids([model.proj.bias, model.norm.weight, model.norm.bias, model.rms.weight])
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0


def test_decay_actually_skips_the_bias_in_a_step():
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(1.0)
    training = TrainingSection(learning_rate=0.1, weight_decay=0.5, optim="adamw_torch")
    optimizer = build_optimizer(model, training.optim, training)
    model.weight.grad = torch.zeros_like(model.weight)
    model.bias.grad = torch.zeros_like(model.bias)
    optimizer.step()
    assert torch.allclose(model.weight, torch.full_like(model.weight, 1 - 0.1 * 0.5))
    assert torch.equal(model.bias, torch.ones(3))


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_warmup_then_decay_matches_the_formula(kind):
    model = nn.Linear(2, 2)
    training = TrainingSection(learning_rate=1.0, lr_scheduler_type=kind, warmup_ratio=0.1, optim="adamw_torch")
    optimizer = build_optimizer(model, training.optim, training)
    scheduler = build_scheduler(optimizer, training, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    progress = (55 - 10) / 90
    want = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
    assert lrs[55] == pytest.approx(want)


def test_warmup_steps_win_over_ratio():
    from launcher.train.optim import warmup_steps

    assert warmup_steps(TrainingSection(warmup_steps=7, warmup_ratio=0.5), 100) == 7
    assert warmup_steps(TrainingSection(warmup_ratio=0.05), 100) == 5


def test_the_engine_steps_with_the_plans_optimizer_not_the_configs():
    """The planner sized the Plan's optimizer (its states differ by kind); a rank builds that one."""
    import torch.distributed as dist

    from launcher.planning.plan import Plan
    from launcher.train.device_mesh import RankMeshes
    from launcher.train.engines import build_engine
    from tiny_lm import tiny_llama

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        plan = Plan(model="m", device="cpu", precision="fp32", optimizer="sgd")
        engine = build_engine(tiny_llama(64), plan, TrainingSection(optim="adamw_torch"), torch.device("cpu"), {},
                              RankMeshes.build(plan.parallel, "cpu"))
        assert type(engine.optimizer) is torch.optim.SGD
    finally:
        dist.destroy_process_group()
