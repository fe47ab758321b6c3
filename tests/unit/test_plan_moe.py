"""`llaunch plan` for mixtures of experts as a user runs it: total and active parameters in the JSON and the
table, FLOPs (hence MFU and step time) on the active parameters, model states on all of them. Expert
parallelism: tests/unit/test_plan_expert_parallel.py."""

import json

import pytest

from launcher.cli import main
from launcher.planning.hardware import gpu_facts
from launcher.planning.models import load_model_spec


def _plan(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_mixtral_on_8_h100_is_planned_on_its_active_flops_with_every_expert_stored(capsys):
    plan = _plan(capsys, "--model", "mixtral-8x7b", "--gpus", "8", "--gpu", "H100")
    spec = load_model_spec("mixtral-8x7b")
    assert (plan["params"], plan["active_params"]) == (46_702_792_704, 12_879_925_248)
    predicted, seq = plan["predicted"], plan["seq_len"]
    peak = gpu_facts("H100").peak_flops["bf16"]
    model_flops_per_token = predicted["mfu"] * peak * 8 / predicted["tokens_per_s"]
    assert model_flops_per_token == pytest.approx(spec.flops_per_token(seq), rel=2e-3)
    assert model_flops_per_token < 0.3 * 6 * plan["params"]  # a dense 46.7B model would be 3.6x more
    assert (plan["strategy"], plan["offload"]) == ("fsdp", "optimizer+params")
    assert plan["memory"]["host_offload_bytes"] == plan["params"] * 16 // 8  # all experts' fp32 states, sharded
    assert plan["memory"]["reserved_bytes"] <= plan["memory"]["limit_bytes"]


def test_the_table_title_says_total_and_active(capsys):
    assert main(["plan", "--model", "mixtral-8x7b", "--gpus", "8", "--gpu", "H100"]) == 0
    assert "mixtral-8x7b: 46.7B params (12.9B active) on 1x8 H100" in capsys.readouterr().out
    assert main(["plan", "--model", "qwen3-8b", "--gpus", "1", "--gpu", "H100"]) == 0
    out = capsys.readouterr().out
    assert "qwen3-8b: 8.19B params on 1x1 H100" in out and "active" not in out


def test_qwen3_30b_a3b_qlora_fits_one_24gb_card_with_its_bf16_experts_in_host_memory(capsys):
    """bitsandbytes quantizes nn.Linear modules only: the 3-D expert parameters (29.0B) stay bf16, so the base
    is 58 GB, not 16, and FSDP's CPU offload holds it."""
    plan = _plan(capsys, "--model", "qwen3-30b-a3b", "--gpus", "1", "--gpu-mem", "24GiB", "--method", "qlora")
    assert (plan["method"], plan["params"], plan["active_params"]) == ("qlora", 30_532_122_624, 3_353_032_704)
    assert (plan["strategy"], plan["offload"]) == ("fsdp", "optimizer+params")
    assert plan["memory"]["host_offload_bytes"] > 2 * load_model_spec("qwen3-30b-a3b").expert_matrix_params
    assert plan["memory"]["reserved_bytes"] <= plan["memory"]["limit_bytes"]


def test_what_it_takes_json_carries_active_params(capsys):
    plan = _plan(capsys, "--model", "deepseek-v3", "--method", "qlora")
    assert (plan["params"], plan["active_params"]) == (671_026_404_352, 37_552_282_624)
