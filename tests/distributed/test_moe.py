"""A tiny random-init Qwen3-MoE trains in the shared loop (`llaunch run` of examples/moe.yaml with the model
swapped, 2 gloo ranks, fp32 on CPU): the same losses and router balance under DDP and FSDP2, the balance loss
logged, and a run crashed after its step-2 checkpoint resumes to exactly the weights of one that never stopped.
The objective itself (HF's cross-entropy + coef x balance loss) is checked in tests/unit/test_chunked_loss.py;
the example as shipped (Mixtral) trains under every strategy in test_examples.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.test_resume import final, max_diff

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[2]
QWEN3_MOE = {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4,
             "num_experts_per_tok": 2, "max_position_embeddings": 64}
SMALL = ["model.name_or_path=qwen3-30b-a3b", "model.overrides=" + json.dumps(QWEN3_MOE),
         "training.max_steps=4", "training.per_device_train_batch_size=2", "training.logging_steps=1",
         "training.save_steps=2", "training.report_to=[]", "training.warmup_steps=0", "data.vocab_size=256",
         "data.block_size=32", "data.max_train_bytes=null", "data.validation_split_percentage=0",
         "parallel.nproc_per_node=2"]


def llaunch_run(output: Path, strategy: str, data: list[str], fault: str | None = None):
    """`llaunch run examples/moe.yaml --output-dir OUT --strategy S key=value...`, the user's command."""
    cmd = [sys.executable, "-m", "launcher", "run", str(REPO / "examples/moe.yaml"), "--output-dir", str(output),
           "--strategy", strategy, *SMALL, *data]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
           **({"LLAUNCH_FAULT": fault} if fault else {})}
    return subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)


def metrics(output: Path) -> list[dict]:
    return [row for row in map(json.loads, (output / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, word_text) -> dict:
    """The data overrides, and the output dirs of 4 uninterrupted steps under DDP and under FSDP2 (one
    tokenized corpus for all), computed once."""
    data = [f"data.train_files=[{word_text}]", f"data.cache_dir={tmp_path_factory.mktemp('moe-cache')}"]
    outputs = {"data": data}
    for strategy in ("ddp", "fsdp"):
        outputs[strategy] = tmp_path_factory.mktemp(f"moe-{strategy}")
        result = llaunch_run(outputs[strategy], strategy, data)
        assert result.returncode == 0, result.stdout[-4000:]
    return outputs


def test_losses_and_router_balance_equal_under_ddp_and_fsdp(runs):
    ddp, fsdp = metrics(runs["ddp"]), metrics(runs["fsdp"])
    assert [row["step"] for row in ddp] == [row["step"] for row in fsdp] == [1, 2, 3, 4]
    for key in ("loss", "aux_loss"):
        assert [row[key] for row in fsdp] == pytest.approx([row[key] for row in ddp], rel=1e-4, abs=0), key
    assert ddp[-1]["loss"] < ddp[0]["loss"]
    # Two experts of four per token: the Switch balance loss is 2.0 when the load is even, more when not.
    assert all(1.9 < row["aux_loss"] < 4.0 for row in ddp), ddp


def test_crashed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(tmp_path, runs):
    crashed = llaunch_run(tmp_path / "run", "fsdp", runs["data"], fault="crash:rank=1,step=3")
    assert crashed.returncode != 0 and not final(tmp_path / "run").exists(), crashed.stdout[-4000:]
    resumed = llaunch_run(tmp_path / "run", "fsdp", runs["data"])
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "checkpoints/step-2 at step 2" in resumed.stdout, resumed.stdout[-4000:]
    assert max_diff(final(tmp_path / "run"), final(runs["fsdp"])) <= 1e-6
    # The resumed steps log the uninterrupted run's losses, the router's balance included.
    resumed_rows, straight_rows = metrics(tmp_path / "run")[-2:], metrics(runs["fsdp"])[-2:]
    for key in ("step", "loss", "aux_loss"):
        assert [r[key] for r in resumed_rows] == pytest.approx([r[key] for r in straight_rows], rel=1e-6, abs=0)


def test_lora_on_attention_router_and_experts_trains_under_fsdp_and_merges_into_every_expert(tmp_path, runs):
    """`--method lora` on the default all-linear: PEFT puts adapters on q/k/v/o, the router and, through its
    ParamWrapper, on the fused gate_up_proj and down_proj of every expert (no dropout there). The base stays
    frozen, so the merged exports of two checkpoints differ exactly where adapters trained: in every expert."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from launcher.cli import main

    run = tmp_path / "lora"
    result = llaunch_run(run, "fsdp", [*runs["data"], "--method", "lora", "finetune.lora_dropout=0"])
    assert result.returncode == 0, result.stdout[-4000:]
    rows = metrics(run)
    assert rows[-1]["loss"] < rows[0]["loss"] and all("aux_loss" in row for row in rows)
    with safe_open(run / "final" / "adapter_model.safetensors", "pt") as adapter:
        adapted = {key.split(".layers.1.")[1].rsplit(".lora_", 1)[0] for key in adapter.keys() if ".layers.1." in key}
    assert adapted == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate",
                       "mlp.experts.base_layer", "mlp.experts"}  # gate_up_proj inside, down_proj outside
    merged = {}
    for step in (2, 4):
        assert main(["export", str(run / "checkpoints" / f"step-{step}"), "--merge", "--to", str(tmp_path / str(step))]) == 0
        merged[step] = load_file(tmp_path / str(step) / "model.safetensors")
    changed = {key for key in merged[4] if not merged[4][key].equal(merged[2][key])}
    assert {key for key in merged[4] if ".mlp.experts." in key} <= changed, sorted(changed)
    assert not any("norm" in key or "embed" in key for key in changed), sorted(changed)
