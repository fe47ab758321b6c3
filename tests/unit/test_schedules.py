"""Every lr_scheduler_type matches its textbook formula at several steps (warmup included)."""

import math

import pytest
import torch

from launcher.errors import LaunchError
from launcher.train.schedules import build_lr_scheduler

LR, WARMUP, TOTAL = 1e-3, 10, 100


def lrs(name, kwargs=None, warmup=WARMUP, total=TOTAL):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = build_lr_scheduler(opt, name, warmup, total, kwargs)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def warm(s):
    return LR * s / WARMUP


def progress(s):
    return (s - WARMUP) / (TOTAL - WARMUP)


FORMULAS = {
    "linear": ({}, lambda s: warm(s) if s < WARMUP else LR * (1 - progress(s))),
    "cosine": ({}, lambda s: warm(s) if s < WARMUP else LR * 0.5 * (1 + math.cos(math.pi * progress(s)))),
    "cosine_with_restarts": ({"num_cycles": 2}, lambda s: warm(s) if s < WARMUP else
                             LR * 0.5 * (1 + math.cos(math.pi * ((2 * progress(s)) % 1.0)))),
    "polynomial": ({"power": 2.0, "lr_end": 1e-5}, lambda s: warm(s) if s < WARMUP else
                   (LR - 1e-5) * (1 - progress(s)) ** 2 + 1e-5),
    "constant": ({}, lambda s: LR),
    "constant_with_warmup": ({}, lambda s: warm(s) if s < WARMUP else LR),
    "step": ({"step_size": 30, "gamma": 0.5}, lambda s: warm(s) if s < WARMUP else LR * 0.5 ** ((s - WARMUP) // 30)),
    "exponential": ({"gamma": 0.97}, lambda s: warm(s) if s < WARMUP else LR * 0.97 ** (s - WARMUP)),
}


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_scheduler_matches_its_formula(name):
    kwargs, formula = FORMULAS[name]
    got = lrs(name, kwargs)
    for step in (0, 3, WARMUP, 25, 41, 50, 77, 99):
        assert got[step] == pytest.approx(formula(step), rel=1e-6, abs=1e-12), (name, step)


def test_one_cycle_rises_over_warmup_then_anneals_to_the_floor():
    got = lrs("one_cycle", {"div_factor": 10.0, "final_div_factor": 100.0}, warmup=20)
    low, floor = LR / 10, LR / 10 / 100
    # torch's OneCycleLR: cosine from low to LR over steps 0..19 (peak at step pct*total-1), then to the floor.
    peak = 19
    for step in (0, 5, 12):
        assert got[step] == pytest.approx(low + (LR - low) * (1 - math.cos(math.pi * step / peak)) / 2, rel=1e-6)
    assert got[peak] == pytest.approx(LR)
    for step in (40, 70, 99):
        frac = (step - peak) / (TOTAL - 1 - peak)
        assert got[step] == pytest.approx(floor + (LR - floor) * (1 + math.cos(math.pi * frac)) / 2, rel=1e-6)


def test_unknown_scheduler_or_kwarg_is_one_sentence():
    with pytest.raises(LaunchError, match="is not one of"):
        lrs("cosine_annealing_warm")
    with pytest.raises(LaunchError, match="does not take"):
        lrs("exponential", {"step_size": 3})
