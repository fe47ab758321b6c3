"""Mixtures of experts and the newer dense families: analytic total / active / LoRA counts equal to what
transformers 5 and PEFT build on the meta device, and to the published figures; the FLOPs rule on active
parameters."""

import json
import re
import subprocess
import sys

import pytest

from launcher.errors import LaunchError
from launcher.planning.models import _catalog, count_params_on_meta, load_model_spec, spec_from_config

# Each architecture cut in depth only (every width as published), keeping one layer of each kind it has.
SHRUNK = {
    "mixtral-8x7b": {"num_hidden_layers": 2},
    "mixtral-8x22b": {"num_hidden_layers": 1},
    "qwen3-30b-a3b": {"num_hidden_layers": 2, "mlp_only_layers": [0]},  # one dense, one MoE layer
    "qwen3-235b-a22b": {"num_hidden_layers": 1},
    "deepseek-v3": {"num_hidden_layers": 3, "first_k_dense_replace": 1},  # one dense, two MoE layers (MLA)
    "gpt-oss-20b": {"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]},
    "gpt-oss-120b": {"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]},
    "qwen3-0.6b": {"num_hidden_layers": 2},
    "qwen3-32b": {"num_hidden_layers": 2},
    "gemma-3-1b": {"num_hidden_layers": 6},
    "gemma-3-27b": {"num_hidden_layers": 6},
    "llama-3.3-70b": {"num_hidden_layers": 2},
}


@pytest.mark.parametrize("name", sorted(SHRUNK))
def test_total_active_and_lora_counts_equal_the_meta_device_model(name):
    """Total: every parameter transformers builds. Active: total less the idle experts' share of the expert
    parameters. LoRA: what PEFT's default all-linear adapts on that model (router and experts included where
    PEFT maps them), built on the meta device too."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model

    spec = load_model_spec(name, SHRUNK[name])
    total, model = count_params_on_meta(spec.hf_config)
    assert spec.num_params == total
    built = spec_from_config(name, model.config.to_dict())  # what the ranks compute MFU with
    assert (built.num_params, built.active_params, built.flops_per_token(512)) == (
        total, spec.active_params, spec.flops_per_token(512))
    experts = sum(p.numel() for key, p in model.named_parameters() if ".experts." in key)
    moe = spec.moe
    idle = experts * (moe.experts - moe.experts_per_token) // moe.experts if moe else 0
    assert spec.active_params == total - idle and (idle > 0) == (moe is not None)
    with init_empty_weights():
        adapted = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    assert spec.lora_params(8, ["all-linear"]) == sum(p.numel() for k, p in adapted.named_parameters() if "lora_" in k)


def _figure(text: str) -> tuple[float, float]:
    """"46.7B" -> (46.7e9, 0.1e9): the value and one unit of its last printed digit."""
    number, scale = text[:-1].replace(",", ""), {"M": 1e6, "B": 1e9}[text[-1]]
    decimals = len(number.split(".")[1]) if "." in number else 0
    return float(number) * scale, 10 ** -decimals * scale


PUBLISHED = sorted(n for n, e in _catalog().items() if "published" in e)


@pytest.mark.parametrize("name", PUBLISHED)
def test_counts_are_within_half_a_percent_of_the_published_figures(name):
    """Within 0.5 %, or within one unit of the figure's last digit where it is printed coarser than that
    (Qwen's "3.3B activated" for 3.35B). gpt-oss's card and DeepSeek's README leave the input embedding out
    of the active count (active_without); non-embedding figures (Qwen3's model cards, Gemma 3's report for the
    text decoder: the 4B-27B vision tower is not part of the spec) leave out the embedding and an untied head."""
    spec, published = load_model_spec(name), _catalog()[name]["published"]
    embedding = spec.vocab * spec.hidden
    ours = {"total": spec.num_params, "non_embedding": spec.num_params - embedding - spec.lm_head_params,
            "active": spec.active_params - (embedding if published.get("active_without") == "embedding" else 0)}
    checked = [key for key in ours if key in published]
    assert checked and published["source"].startswith("https://")
    for key in checked:
        value, unit = _figure(published[key])
        assert abs(ours[key] - value) <= max(0.005 * value, unit), (key, ours[key], value)


def test_catalog_moe_figures_and_aliases():
    mixtral = load_model_spec("Mixtral-8x7B-v0.1")
    assert mixtral.name == "mixtral-8x7b" and (mixtral.moe.experts, mixtral.moe.experts_per_token) == (8, 2)
    v3 = load_model_spec("deepseek-v3")
    assert (v3.moe.experts, v3.moe.shared_experts, v3.moe.experts_per_token, v3.moe.layers[0]) == (256, 1, 8, 3)
    assert (v3.mla.q_lora_rank, v3.mla.kv_lora_rank, v3.mla.qk_head_dim, v3.mla.v_head_dim) == (1536, 512, 192, 128)
    oss = load_model_spec("gpt-oss-20b")
    assert (oss.sliding_window, oss.sliding_layers, oss.moe.biases) == (128, 12, True)
    assert load_model_spec("gemma-3-27b").sliding_layers == 52  # 5 local : 1 global over 62 layers


def test_flops_count_the_active_experts_and_the_attention_each_layer_sees():
    spec, seq = load_model_spec("mixtral-8x7b"), 4096
    matmuls = spec.active_params - spec.vocab * spec.hidden - (2 * 32 + 1) * 4096  # less the embedding and norms
    assert spec.flops_per_token(seq) == 6 * matmuls + 6 * 32 * seq * 32 * 128
    assert spec.flops_per_token(seq) < 0.3 * 6 * spec.num_params  # not a dense 46.7B model
    oss = load_model_spec("gpt-oss-20b")  # 12 full layers see 4096 keys, 12 sliding ones 128
    attention = oss.flops_per_token(seq) - 6 * oss.active_linear_params
    assert attention == 3 * 64 * (64 + 64) * (12 * seq + 12 * 128)
    v3 = load_model_spec("deepseek-v3")  # MLA: q.k over 192 dims, attention-weighted v over 128
    assert v3.flops_per_token(seq) - 6 * v3.active_linear_params == 3 * 128 * (192 + 128) * 61 * seq


def test_a_local_moe_config_json_is_read_into_the_same_spec_without_torch(tmp_path):
    for name in ("deepseek-v3", "qwen3-30b-a3b", "gpt-oss-20b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(_catalog()[name]["hf_config"]))
    dirs = [str(tmp_path / name) for name in ("deepseek-v3", "qwen3-30b-a3b", "gpt-oss-20b")]
    code = ("import sys; from launcher.planning.models import load_model_spec; "
            f"specs = [load_model_spec(d) for d in {dirs!r}]; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "print([(s.num_params, s.active_params, s.moe.experts) for s in specs])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    expected = [(s.num_params, s.active_params, s.moe.experts)
                for s in map(load_model_spec, ("deepseek-v3", "qwen3-30b-a3b", "gpt-oss-20b"))]
    assert done.stdout.strip() == str(expected)


@pytest.mark.parametrize("override, message", [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok 9 must be between 1 and the 8 routed experts"),
    ({"num_local_experts": 0}, "must be a positive integer"),
])
def test_impossible_expert_counts_are_one_sentence(override, message):
    with pytest.raises(LaunchError, match=re.escape(message)):
        load_model_spec("mixtral-8x7b", override)


def test_lora_targets_of_an_moe_name_what_peft_can_adapt():
    spec = load_model_spec("deepseek-v3")
    with pytest.raises(LaunchError, match="not linear layers of deepseek-v3; use all-linear or some of"):
        spec.lora_params(8, ["q_proj"])  # MLA has q_a_proj / q_b_proj
    attention_only = spec.lora_params(8, ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"])
    assert spec.lora_params(8, ["all-linear"]) > 50 * attention_only  # the experts' adapters dominate


def test_a_config_json_with_impossible_latent_attention_is_one_sentence(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**_catalog()["deepseek-v3"]["hf_config"], "v_head_dim": 0}))
    with pytest.raises(LaunchError, match="latent attention sizes must be positive"):
        load_model_spec(str(tmp_path))
