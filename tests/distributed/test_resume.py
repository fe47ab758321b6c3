"""Preempted, killed and damaged runs resume to exactly the weights of a run that never stopped.

The SIGTERM tests run the product (`llaunch run`, 2 gloo ranks, fp32 on CPU) for every strategy. The fault
tests drive tests/distributed/resume_worker.py, a small rank program around the same Checkpointer and
PreemptionHandler, where a signal or a kill can be placed at an exact point (inside accumulation, inside an
eval, between writing shards and publishing). "Exact" means final safetensors differ by <= 1e-6.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.errors import REQUEUE_EXIT_CODE
from tests.distributed.sigterm import checkpoint_published, stop_with_sigterm

pytestmark = pytest.mark.dist

WORKER = Path(__file__).with_name("resume_worker.py")
REPO = Path(__file__).resolve().parents[2]


def torchrun(output, strategy, *extra, nproc=2, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), "--strategy", strategy, "--output", str(output), *extra]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                **(env or {})}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=400)


def max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys()
    return max((left[k] - right[k]).abs().max().item() for k in left)


def final(output: Path) -> Path:
    return output / "final" / "model.safetensors"


def wait_for_manifest(proc, path: Path, log: Path, timeout=300):
    deadline = time.monotonic() + timeout
    while not (path / "manifest.json").exists():
        assert proc.poll() is None, f"run ended before {path.name} was written:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {path} after {timeout}s:\n{log.read_text()[-4000:]}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """40 uninterrupted steps per strategy, computed once."""
    runs = {}

    def get(strategy):
        if strategy not in runs:
            output = tmp_path_factory.mktemp(f"straight-{strategy}")
            result = torchrun(output, strategy)
            assert result.returncode == 0, result.stdout + result.stderr
            runs[strategy] = output
        return runs[strategy]

    return get


TINY_CONFIG = """
model:
  name_or_path: tinyllama-1.1b
  overrides: {{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4,
              num_key_value_heads: 2, max_position_embeddings: 64, attention_dropout: 0.1,
              tie_word_embeddings: true}}
data:
  train_files: ["{text}"]
  vocab_size: 256
  block_size: 32
  max_eval_samples: 8
  cache_dir: "{cache}"
training:
  learning_rate: 3.0e-3
  max_steps: 40
  per_device_train_batch_size: 2
  gradient_accumulation_steps: 2
  logging_steps: 10
  eval_steps: 15
  save_steps: 10
  save_total_limit: 2
  report_to: []
parallel:
  nproc_per_node: 2
"""


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory, word_text):
    root = tmp_path_factory.mktemp("tiny")
    config = root / "tiny.yaml"
    config.write_text(TINY_CONFIG.format(text=word_text, cache=root / "cache"))
    return config


def logged_losses(output) -> dict[int, float]:
    """The training loss metrics.jsonl logged at each step (a resumed run's later line for a step wins)."""
    rows = [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def llaunch_run(config, output, strategy, *extra):
    """The user's command, exactly: `llaunch run CONFIG --output-dir OUT --strategy S [key=value]`."""
    return subprocess.run(llaunch_command(config, output, strategy, *extra), env=llaunch_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=400)


def llaunch_command(config, output, strategy, *extra) -> list[str]:
    return [sys.executable, "-m", "launcher", "run", str(config), "--output-dir", str(output), "--strategy", strategy,
            *extra]


def llaunch_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.parametrize("strategy,extra", [("ddp", ()), ("fsdp", ("training.async_save=true",)), ("zero2", ()),
                                            ("zero3", ())])
def test_sigterm_after_step_20_then_same_command_gives_same_weights(tmp_path, tiny_config, strategy, extra):
    straight = llaunch_run(tiny_config, tmp_path / "straight", strategy, *extra)
    assert straight.returncode == 0, straight.stdout[-4000:]

    run = tmp_path / "run"
    stopped_at = stop_with_sigterm(llaunch_command(tiny_config, run, strategy, *extra), llaunch_env(),
                                   tmp_path / "interrupted.log", checkpoint_published(run / "checkpoints" / "step-20"))
    assert 20 <= stopped_at < 40
    assert not final(tmp_path / "run").exists()

    resumed = llaunch_run(tiny_config, tmp_path / "run", strategy, *extra)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert f"checkpoints/step-{stopped_at} at step {stopped_at}" in resumed.stdout
    assert max_diff(final(tmp_path / "run"), final(tmp_path / "straight")) <= 1e-6
    # The step window the stop cut (logging every 10 steps) resumed with its sums: the same logged losses.
    straight_losses, resumed_losses = logged_losses(tmp_path / "straight"), logged_losses(tmp_path / "run")
    after = [step for step in straight_losses if step > stopped_at]
    assert after and all(resumed_losses[step] == pytest.approx(straight_losses[step], rel=1e-6, abs=0) for step in after), \
        (stopped_at, straight_losses, resumed_losses)

    # `llaunch export` turns this strategy's sharded step-40 checkpoint into the same Hugging Face weights.
    from launcher.train.export import export_checkpoint

    exported = export_checkpoint(tmp_path / "run" / "checkpoints" / "step-40", tmp_path / "exported")
    assert (tmp_path / "exported" / "config.json").exists() and (tmp_path / "exported" / "tokenizer.json").exists()
    assert max_diff(exported, final(tmp_path / "run")) == 0.0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")  # the tied model loads, still tied
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_signal_inside_accumulation_then_inside_eval_each_stop_all_ranks_at_the_step_boundary(tmp_path, straight):
    """Only one rank is signalled each time; the vote makes both save the same step and exit to be requeued."""
    for hook, value, step in (("SIGNAL_AT", "13:0:1", 14), ("SIGNAL_IN_EVAL", "20:0", 20)):
        result = torchrun(tmp_path, "ddp", env={hook: value})
        assert f"PREEMPTED step={step}" in result.stdout, result.stdout + result.stderr
        assert f"exitcode  : {REQUEUE_EXIT_CODE}" in result.stderr, result.stderr[-3000:]
    result = torchrun(tmp_path, "ddp")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RESUMED step=20" in result.stdout
    assert max_diff(final(tmp_path), final(straight("ddp"))) <= 1e-6


def test_kill_9_mid_save_resumes_from_previous_checkpoint(tmp_path, straight):
    result = torchrun(tmp_path, "ddp", env={"KILL_IN_SAVE": "30"})
    assert result.returncode != 0
    assert (tmp_path / "checkpoints" / ".step-30.partial").exists()  # the half-written save is left behind
    assert not (tmp_path / "checkpoints" / "step-30").exists()
    result = torchrun(tmp_path, "ddp")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RESUMED step=20" in result.stdout
    assert max_diff(final(tmp_path), final(straight("ddp"))) <= 1e-6
    assert not (tmp_path / "checkpoints" / ".step-30.partial").exists()


def test_corrupted_shard_is_named_and_previous_checkpoint_used(tmp_path, straight):
    output = tmp_path / "run"
    shutil.copytree(straight("ddp"), output)
    shutil.rmtree(output / "final")
    shard = output / "checkpoints" / "step-40" / "engine" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = torchrun(output, "ddp")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "engine/__1_0.distcp is corrupted" in result.stderr
    assert "RESUMED step=30" in result.stdout
    assert max_diff(final(output), final(straight("ddp"))) <= 1e-6


@pytest.mark.parametrize("strategy", ["fsdp", "hsdp"])
def test_fsdp_checkpoint_reshards_2_to_1_and_1_to_2(tmp_path, strategy):
    """Saved by 2 ranks, resumed by 1 FSDP rank, and its checkpoint by 2 again. HSDP writes DCP under FSDP's
    names, so its replicated (2, 1)-mesh state crosses to FSDP and back the same way."""
    result = torchrun(tmp_path, strategy, "--steps", "20", nproc=2)
    assert result.returncode == 0, result.stdout + result.stderr
    two_rank_weights = tmp_path / "two.safetensors"
    shutil.copy(final(tmp_path), two_rank_weights)

    loaded = tmp_path / "loaded-by-1.safetensors"
    result = torchrun(tmp_path, "fsdp", "--steps", "25", "--dump-loaded", str(loaded), nproc=1)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RESUMED step=20" in result.stdout
    assert max_diff(loaded, two_rank_weights) == 0.0

    loaded = tmp_path / "loaded-by-2.safetensors"
    result = torchrun(tmp_path, strategy, "--steps", "25", "--dump-loaded", str(loaded), nproc=2)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RESUMED step=25" in result.stdout
    assert max_diff(loaded, final(tmp_path)) == 0.0  # the 1-rank run's step-25 weights


def test_deepspeed_checkpoint_refuses_another_world_size(tmp_path, straight):
    output = tmp_path / "run"
    shutil.copytree(straight("zero2"), output)
    result = torchrun(output, "zero2", "--steps", "50", nproc=1)
    assert "exitcode  : 2" in result.stderr, result.stderr[-3000:]
    assert "was saved by 2 ranks and this run has 1" in result.stdout + result.stderr
    assert "ds_to_universal" in result.stdout + result.stderr
