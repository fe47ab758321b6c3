"""Expert parallelism through the user's command, `llaunch run examples/moe.yaml --nproc-per-node N --ep E` (gloo
ranks, fp32 on CPU; --ep takes FSDP2, whose shard ranks ep borrows). EP 1 is the reference: DDP on as many ranks.

- EP 2 on 2 ranks (the example's Mixtral, 4 experts; DeepSeek-V3's shape: MLA, a dense layer, a shared expert
  beside 4 routed ones) and EP 4 on 4 ranks (Qwen3-MoE, 4 experts: one per rank) log the first 5 losses, router
  balance losses and gradient norms of EP 1 within 1e-4, and end 5 steps within 1e-5 of its weights (gathered
  into final/). The gradient norm is what a wrongly scaled expert gradient moves
  most: Adam's update hardly does.
- An EP 2 run stopped by SIGTERM after step 2 and run again ends with the weights of the one that never stopped;
  its checkpoint resumes under EP 1, and `llaunch export` of its last checkpoint is the full-expert model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.sigterm import stop_with_sigterm
from tests.distributed.test_moe import QWEN3_MOE, metrics
from tests.distributed.test_resume import final, max_diff

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[2]
STEPS = ["training.max_steps=5", "training.per_device_train_batch_size=2", "training.logging_steps=1",
         "training.save_steps=5", "training.report_to=[]", "training.warmup_steps=0", "data.vocab_size=256",
         "data.block_size=32", "data.max_train_bytes=null", "data.validation_split_percentage=0"]
QWEN3 = ["model.name_or_path=qwen3-30b-a3b", "model.overrides=" + json.dumps(QWEN3_MOE)]
# DeepSeek-V3's shape: MLA attention, a dense first layer, then 4 routed experts (top-2) beside a shared expert.
DEEPSEEK_V3 = ["model.name_or_path=deepseek-v3", "model.overrides=" + json.dumps({
    "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 32, "num_hidden_layers": 2,
    "first_k_dense_replace": 1, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 16,
    "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "max_position_embeddings": 64})]
SLOW_RANK = "slow:rank=1,ms=1000"  # a step takes a second: SIGTERM lands inside the run, not after it


def command(output: Path, ranks: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "launcher", "run", str(REPO / "examples/moe.yaml"), "--nproc-per-node", str(ranks),
            "--output-dir", str(output), *flags, *STEPS]


def run_env(fault: str | None = None) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
            **({"LLAUNCH_FAULT": fault} if fault else {})}


def llaunch_run(output: Path, ranks: int, *flags: str) -> Path:
    result = subprocess.run(command(output, ranks, *flags), env=run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:]
    return output


def sigterm_after_step_2(output: Path, ranks: int, *flags: str) -> int:
    """Send `llaunch run` SIGTERM once step 2 is logged (as `kill` or a scheduler would); the step it saved."""
    log = output.with_suffix(".log")
    return stop_with_sigterm(command(output, ranks, *flags), run_env(SLOW_RANK), log,
                             lambda: log.exists() and "step 2: loss" in log.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, word_text) -> dict:
    """EP 1 (DDP) and EP 2 on 2 ranks, EP 1 and EP 4 on 4 ranks, and an EP 2 run stopped by SIGTERM and run
    again (one tokenized corpus for all), computed once."""
    root = tmp_path_factory.mktemp("ep")
    data = [f"data.train_files=[{word_text}]", f"data.cache_dir={root / 'cache'}"]
    out = {"data": data, "root": root}
    out["ep1"] = llaunch_run(root / "ep1", 2, "--strategy", "ddp", *data)
    out["ep2"] = llaunch_run(root / "ep2", 2, "--ep", "2", *data)
    out["stopped_at"] = sigterm_after_step_2(root / "stopped", 2, "--ep", "2", *data)
    out["stopped"] = llaunch_run(root / "stopped", 2, "--ep", "2", *data)
    out["ep1x4"] = llaunch_run(root / "ep1x4", 4, "--strategy", "ddp", *QWEN3, *data)
    out["ep4x4"] = llaunch_run(root / "ep4x4", 4, "--ep", "4", *QWEN3, *data)
    out["dsv3_ep1"] = llaunch_run(root / "dsv3_ep1", 2, "--strategy", "ddp", *DEEPSEEK_V3, *data)
    out["dsv3_ep2"] = llaunch_run(root / "dsv3_ep2", 2, "--ep", "2", *DEEPSEEK_V3, *data)
    return out


@pytest.mark.parametrize("ep,reference", [("ep2", "ep1"), ("ep4x4", "ep1x4"), ("dsv3_ep2", "dsv3_ep1")])
def test_losses_balance_and_gradients_equal_ep1(runs, ep, reference):
    """DeepSeek-V3 balances its experts without an auxiliary loss (a routing bias, arXiv 2412.19437 sec. 2.1.2):
    its transformers model has none to log."""
    expert, plain = metrics(runs[ep]), metrics(runs[reference])
    assert [row["step"] for row in expert] == [row["step"] for row in plain] == [1, 2, 3, 4, 5]
    for key in ("loss", "grad_norm") if ep.startswith("dsv3") else ("loss", "aux_loss", "grad_norm"):
        assert [row[key] for row in expert] == pytest.approx([row[key] for row in plain], rel=1e-4, abs=0), key
    assert max_diff(final(runs[ep]), final(runs[reference])) <= 1e-5


def test_sigterm_then_the_same_command_ends_with_the_uninterrupted_weights(runs):
    assert 2 <= runs["stopped_at"] < 5
    assert max_diff(final(runs["stopped"]), final(runs["ep2"])) <= 1e-6
    resumed = [row for row in metrics(runs["stopped"]) if row["step"] > runs["stopped_at"]]
    straight = metrics(runs["ep2"])[runs["stopped_at"]:]
    for key in ("step", "loss", "aux_loss"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in straight], rel=1e-6, abs=0), key


def test_an_ep2_checkpoint_resumes_under_ep1_and_exports_every_expert(runs, tmp_path):
    stopped = runs["stopped"] / "checkpoints" / f"step-{runs['stopped_at']}"
    resumed = llaunch_run(tmp_path / "ep1", 2, "--strategy", "fsdp", "--resume-from", str(stopped), *runs["data"])
    assert max_diff(final(resumed), final(runs["ep2"])) <= 1e-5

    from safetensors.torch import load_file

    from launcher.train.export import export_checkpoint

    exported = export_checkpoint(runs["stopped"] / "checkpoints" / "step-5", tmp_path / "exported")
    assert max_diff(exported, final(runs["stopped"])) == 0.0
    shapes = {key: tensor.shape for key, tensor in load_file(exported).items()}
    assert shapes == {key: tensor.shape for key, tensor in load_file(final(runs["ep1"])).items()}  # EP 1's model
    assert {key.split(".experts.")[1].split(".")[0] for key in shapes if ".experts." in key} == {"0", "1", "2", "3"}
