"""Tensor + sequence parallelism composed with FSDP2 trains as data parallelism does (4 gloo processes on CPU,
the tiny fp32 Llama, tp 2 x dp_shard 2): the real Trainer gives the same first 5 losses as DDP over 4 ranks with
the same global batch, untied and tied, and the same weights after 5 steps; through the user's `llaunch run`,
exact resume after SIGTERM, and its checkpoint resumed by plain FSDP on 4 ranks (dp 4) and by tp 2 x pp 2, exported
and verified. The losses and gradients equal to DDP's are what checks the vocab-parallel chunked loss
(launcher/train/chunked_loss.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.sigterm import checkpoint_published, stop_with_sigterm
from tests.distributed.test_resume import final, max_diff
from tests.tiny_run import tiny_run_config

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[2]
STEPS = 5
# The same 4 sequences per step in every layout: tp 2 x dp 2 at micro-batch 2, dp 4 at micro-batch 1.
TP2 = ("--strategy", "fsdp", "--tp", "2", "training.per_device_train_batch_size=2")
FSDP = ("--strategy", "fsdp", "--tp", "1", "training.per_device_train_batch_size=1")
# tp 2 x pp 2 (dp 1): 2 microbatches of 2, one decoder layer per stage.
TP2_PP2 = ("--strategy", "fsdp", "--tp", "2", "--pp", "2", "--pp-microbatches", "2",
           "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=2")


def llaunch_command(config: Path, output: Path, *flags: str, fault: str | None = None) -> tuple[list[str], dict]:
    """`llaunch run CONFIG --output-dir OUT --nproc-per-node 4 FLAGS` and its environment."""
    cmd = [sys.executable, "-m", "launcher", "run", str(config), "--output-dir", str(output), "--nproc-per-node", "4",
           *flags]
    return cmd, {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
                 **({"LLAUNCH_FAULT": fault} if fault else {})}


def llaunch_run(config: Path, output: Path, *flags: str):
    cmd, env = llaunch_command(config, output, *flags)
    result = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
    return result


def rows(output: Path) -> list[dict]:
    """The training rows of metrics.jsonl (a resumed run's later line for a step wins)."""
    by_step = {}
    for row in map(json.loads, (output / "metrics.jsonl").read_text().splitlines()):
        if "loss" in row:
            by_step[row["step"]] = row
    return [by_step[step] for step in sorted(by_step)]


WORKER = Path(__file__).with_name("engines_worker.py")
COMPARED = ["ddp:1:1", "fsdp:2:1:tp2", "ddp:1:1:tied", "fsdp:2:1:tied+tp2"]  # strategy:micro:accum:options


@pytest.fixture(scope="module")
def compared(tmp_path_factory, torchrun_workers, word_text):
    """The real Trainer under DDP and under tp 2 x FSDP 2, untied and tied, in one torchrun of 4 processes
    (tests/distributed/engines_worker.py: each step's loss and grad norm, the tokens seen, the gathered weights)."""
    out = tmp_path_factory.mktemp("tp-vs-ddp")
    torchrun_workers(WORKER, "--out", str(out), "--data", str(word_text), "--steps", str(STEPS), "--learning-rate",
                     "1e-3", *COMPARED, nproc=4)
    return out, json.loads((out / "losses.json").read_text()), json.loads((out / "facts.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """`llaunch run` under tp 2 x FSDP 2 for 5 steps (checkpoints at 2 and 4), and plain FSDP on 4 ranks
    resuming its step-2 checkpoint."""
    root = tmp_path_factory.mktemp("tp")
    config = tiny_run_config(root, model={"max_position_embeddings": 64},
                             training={"max_steps": STEPS, "logging_steps": 1, "save_steps": 2, "learning_rate": 1e-3,
                                       "warmup_steps": 0, "max_grad_norm": 0.5, "report_to": []})
    out = {"config": config, "tp": root / "tp", "dp4": root / "dp4-from-tp", "tp-pp": root / "tp-pp-from-tp"}
    llaunch_run(config, out["tp"], *TP2)
    for name, flags in (("dp4", FSDP), ("tp-pp", TP2_PP2)):
        llaunch_run(config, out[name], *flags, f"training.resume_from_checkpoint={out['tp'] / 'checkpoints' / 'step-2'}")
    return out


@pytest.mark.parametrize("tie", ["", "tied+"])
def test_tp2_x_fsdp2_trains_as_ddp_does(compared, tie):
    """The first 5 losses within 1e-4 relative, the same grad norms (over DTensors) and tokens, and the gathered
    weights after 5 steps within 1e-5."""
    out, losses, facts = compared
    ddp, tp = f"ddp:1:1{':tied' if tie else ''}", f"fsdp:2:1:{tie}tp2"
    assert len(losses[tp]) == STEPS and losses[ddp][-1] < losses[ddp][0]
    assert losses[tp] == pytest.approx(losses[ddp], rel=1e-4, abs=0)
    assert facts[tp]["grad_norms"] == pytest.approx(facts[ddp]["grad_norms"], rel=1e-4, abs=0)
    assert facts[tp]["tokens_seen"] == facts[ddp]["tokens_seen"]
    assert max_diff(*(out / run.replace(":", "-") / "weights.safetensors" for run in (tp, ddp))) <= 1e-5
    if tie:
        assert losses[tp][0] != pytest.approx(losses["fsdp:2:1:tp2"][0], rel=1e-4)  # tying changed the model


@pytest.mark.parametrize("layout", ["dp4", "tp-pp"])
def test_a_tp_checkpoint_resumes_under_plain_fsdp_and_under_tp2_x_pp2(runs, layout):
    """DCP reshards the (dp_shard, tp) DTensors to dp 4, and to tp 2 x pp 2's stages (each stage's DTensors on
    the tp mesh); the data position and the scheduler carry on."""
    resumed, straight = rows(runs[layout]), rows(runs["tp"])
    assert [r["step"] for r in resumed] == [3, 4, 5]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight[2:]], rel=1e-4, abs=0)
    assert max_diff(final(runs[layout]), final(runs["tp"])) <= 1e-5


def test_a_tp_checkpoint_exports_the_model_the_dp4_run_saved_and_verifies(runs, tmp_path):
    """`llaunch export` consolidates the (dp_shard, tp) DTensors under their model-global names: the step-4
    weights of the tp run are those of the dp 4 run that resumed its step 2."""
    from launcher.cli import main

    for name in ("tp", "dp4"):
        assert main(["export", str(runs[name] / "checkpoints" / "step-4"), "--to", str(tmp_path / name)]) == 0
    assert max_diff(tmp_path / "tp" / "model.safetensors", tmp_path / "dp4" / "model.safetensors") <= 1e-5
    assert main(["checkpoints", str(runs["tp"]), "--verify"]) == 0


def test_sigterm_then_the_same_command_ends_with_the_uninterrupted_weights(runs, tmp_path):
    output = tmp_path / "run"
    cmd, env = llaunch_command(runs["config"], output, *TP2, fault="slow:rank=0,ms=1500")
    stopped_at = stop_with_sigterm(cmd, env, tmp_path / "interrupted.log",
                                   checkpoint_published(output / "checkpoints" / "step-2"))
    assert 2 <= stopped_at < STEPS and not final(output).exists()
    resumed = llaunch_run(runs["config"], output, *TP2)
    assert f"checkpoints/step-{stopped_at} at step {stopped_at}" in resumed.stdout
    assert max_diff(final(output), final(runs["tp"])) <= 1e-6
