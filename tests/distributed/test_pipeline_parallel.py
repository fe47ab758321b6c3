"""Pipeline parallelism through `llaunch run` (4 gloo ranks, fp32 on CPU): pp 2 x dp 2 trains a tiny Llama to the
losses and weights of DDP on 4 ranks with the same global batch, under 1F1B (with selective recompute) and
interleaved 1F1B, with untied and tied embeddings, and so does tp 2 x pp 2 (with selective recompute) (each stage split over the tp ranks; tied under interleaved
1F1B, untied under GPipe, stopped by SIGTERM and resumed by the same command); a pipeline's
checkpoint resumes under plain DDP; export and `llaunch checkpoints --verify` read it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.sigterm import checkpoint_published, stop_with_sigterm
from tests.tiny_run import tiny_run_config

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[2]
STEPS = 8  # every run's length: the LR schedule (and so every loss) depends on it
# pp 2 x dp 2 with 2 microbatches of 2 and dp 4 with one micro-batch of 2: the same 8 sequences per step.
PIPELINE = ("--nproc-per-node", "4", "--pp", "2", "--pp-microbatches", "2")
REFERENCE = ("--nproc-per-node", "4", "--strategy", "ddp", "training.gradient_accumulation_steps=1")
RUNS = {  # name: (tied embeddings, flags)
    "ddp": (False, REFERENCE),
    "ddp-tied": (True, REFERENCE),
    # Stages recompute selectively (op-level SAC) here: the same numbers as storing every activation.
    "1f1b": (False, (*PIPELINE, "--strategy", "ddp", "--pp-schedule", "1f1b", "--activation-checkpointing", "selective")),
    "interleaved-tied": (True, (*PIPELINE, "--strategy", "fsdp", "--pp-schedule", "interleaved-1f1b",
                                "--pp-virtual-stages", "2")),
    # tp 2 x pp 2 (dp 1): 2 microbatches of 4, the tied embedding's two copies split by vocabulary over tp.
    "tp2-interleaved-tied": (True, (*PIPELINE, "--tp", "2", "--strategy", "fsdp", "--pp-schedule",
                                    "interleaved-1f1b", "--pp-virtual-stages", "2", "--activation-checkpointing",
                                    "selective", "training.per_device_train_batch_size=4")),
}


def command(config: Path, output: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "launcher", "run", str(config), "--output-dir", str(output), *flags]


def run(config: Path, output: Path, *flags: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command(config, output, *flags), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def losses(output: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def weights(output: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(output / "final" / "model.safetensors")


def worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    training = {"max_steps": STEPS, "gradient_accumulation_steps": 2, "logging_steps": 1, "learning_rate": 3e-3,
                "save_steps": 4, "report_to": [], "eval_steps": None}
    made = {}
    for tied in (False, True):
        folder = root / ("tied" if tied else "untied")
        folder.mkdir()
        made[tied] = tiny_run_config(folder, cache_dir=root / "cache", training=training,
                                     model={"num_hidden_layers": 4, "tie_word_embeddings": tied})
    return root, made


@pytest.fixture(scope="module")
def runs(configs):
    root, made = configs
    for name, (tied, flags) in RUNS.items():
        run(made[tied], root / name, *flags)
    return root


@pytest.mark.parametrize("name,reference", [("1f1b", "ddp"), ("interleaved-tied", "ddp-tied"),
                                            ("tp2-interleaved-tied", "ddp-tied")])
def test_pipeline_trains_to_ddps_losses_and_weights(runs, name, reference):
    got, want = losses(runs / name), losses(runs / reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert want[1] > want[STEPS]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4), (name, step, got, want)
    assert worst(weights(runs / name), weights(runs / reference)) < 1e-5


def test_pipeline_checkpoint_resumes_under_ddp_and_exports(runs, configs):
    """pp 2 x dp 2's step-4 checkpoint (every stage under the unsplit model's names) continues as dp 4."""
    root, made = configs
    checkpoint = runs / "1f1b" / "checkpoints" / "step-4"
    out = run(made[False], root / "resumed", *REFERENCE, "--resume-from", str(checkpoint))
    assert "at step 4" in out, out[-2000:]
    got, want = losses(root / "resumed"), losses(runs / "ddp")
    assert [got[step] for step in range(5, STEPS + 1)] == pytest.approx([want[s] for s in range(5, STEPS + 1)], rel=1e-4)
    assert worst(weights(root / "resumed"), weights(runs / "ddp")) < 1e-5

    from launcher.train.export import export_checkpoint

    from safetensors.torch import load_file

    exported = export_checkpoint(runs / "1f1b" / "checkpoints" / f"step-{STEPS}", root / "exported")
    assert worst(load_file(exported), weights(runs / "1f1b")) == 0.0
    verify = subprocess.run([sys.executable, "-m", "launcher", "checkpoints", str(runs / "1f1b"), "--verify"],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_sigterm_then_the_same_tp2_x_pp2_gpipe_command_ends_on_ddps_weights(runs, configs):
    """tp 2 x pp 2 under GPipe, untied (the tied one is compared above): SIGTERM after the step-4 checkpoint,
    then the same command resumes it; every loss and the final weights are those of DDP's uninterrupted run."""
    root, made = configs
    output = root / "tp2-gpipe"
    flags = (*PIPELINE, "--tp", "2", "--strategy", "fsdp", "--pp-schedule", "gpipe",
             "training.per_device_train_batch_size=4")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    stopped = stop_with_sigterm(command(made[False], output, *flags), env, root / "tp2-gpipe.log",
                                checkpoint_published(output / "checkpoints" / "step-4"), timeout=240)
    assert 4 <= stopped < STEPS, "the run ended before the signal came; it tested no resume"
    assert f"at step {stopped}" in run(made[False], output, *flags)
    want = losses(runs / "ddp")
    assert [losses(output)[s] for s in want] == pytest.approx(list(want.values()), rel=1e-4)
    assert worst(weights(output), weights(runs / "ddp")) < 1e-5
