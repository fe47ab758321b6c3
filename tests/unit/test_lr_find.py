"""LR range test: exponential sweep, bias-corrected smoothing, a suggestion on the steep part, early stop."""

import math

import pytest
import torch

from launcher.errors import LaunchError
from launcher.train import lr_find
from tests.tiny_run import tiny_run_config


def test_sweep_is_exponential_between_the_bounds():
    lrs = lr_find.sweep_lrs(1e-6, 1.0, 13)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert all(r == pytest.approx(10 ** 0.5) for r in ratios)
    with pytest.raises(LaunchError):
        lr_find.sweep_lrs(1.0, 1e-3, 100)


def test_smoothing_is_bias_corrected():
    assert lr_find.smooth([5.0] * 10, beta=0.9) == pytest.approx([5.0] * 10)
    assert lr_find.smooth([1.0, 3.0], beta=0.5) == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75])


def test_suggestion_is_where_the_loss_falls_fastest():
    lrs = lr_find.sweep_lrs(1e-5, 1.0, 60)
    # A sigmoid drop centred at lr = 1e-3 on a log axis, then divergence above 1e-1.
    losses = [3 - 2 / (1 + math.exp(-3 * (math.log10(lr) + 3))) + (50 * (lr - 0.1) if lr > 0.1 else 0) for lr in lrs]
    suggested = lr_find.suggest_lr(lrs, losses)
    assert 5e-4 < suggested < 2e-3


def test_sweep_on_a_real_model_stops_at_divergence_and_plots(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    x = torch.randn(256, 8)
    y = x.sum(dim=1, keepdim=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lrs = lr_find.sweep_lrs(1e-4, 100.0, 120)
    sched = lr_find.sweep_scheduler(opt, lrs)
    seen = []

    def step():
        seen.append(opt.param_groups[0]["lr"])
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        return loss.item()

    result = lr_find.run_lr_find(step, lrs, beta=0.9)
    assert seen == pytest.approx(lrs[:len(seen)])  # the scheduler applied the sweep
    assert result.stopped_early and len(result.lrs) < len(lrs)
    assert result.suggested_lr is not None and 1e-3 < result.suggested_lr < 10
    assert min(result.smoothed) < result.smoothed[0]
    lr_find.plot(result, tmp_path / "lr.png")
    assert (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG"


def test_lr_find_refuses_a_run_directory_and_writes_only_its_own_files(tmp_path, capsys):
    """lr-find once forced --overwrite on its --output-dir: pointed at a run, it deleted the checkpoints."""
    from launcher.cli import main

    config = tiny_run_config(tmp_path, training={"report_to": []})
    run = tmp_path / "run"
    assert main(["run", str(config), "--output-dir", str(run), "--dry-run"]) == 0
    (run / "checkpoints" / "step-5").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    capsys.readouterr()
    assert main(["lr-find", str(config), "--output-dir", str(run), "--num-steps", "10"]) == 2
    err = capsys.readouterr().err
    assert "training run's directory" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before

    sweep = tmp_path / "sweep"
    code = main(["lr-find", str(config), "--output-dir", str(sweep), "--num-steps", "10"])
    assert code in (0, 1) and sorted(p.name for p in sweep.iterdir()) == ["lr_find.json", "lr_find.png"]
