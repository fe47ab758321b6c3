"""Model specs: catalog facts, exact parameter counts, and the errors a user sees for a bad --model."""

import json

import pytest

from launcher.errors import LaunchError
from launcher.planning.models import _catalog, count_params_on_meta, load_model_spec


@pytest.mark.parametrize("name", sorted(n for n, e in _catalog().items() if e.get("published_params")))
def test_analytic_count_equals_published_count(name):
    spec = load_model_spec(name)
    assert spec.num_params == spec.published_params, name


@pytest.mark.parametrize("name", ["gpt2", "tinyllama-1.1b", "qwen2.5-0.5b", "mistral-7b", "llama-3.2-1b"])
def test_analytic_count_equals_meta_device_count_on_shrunk_configs(name):
    """Same family formula as the full-size entries, on configs small enough to build in a blink."""
    small = {"gpt2": {"n_layer": 2}, "mistral-7b": {"num_hidden_layers": 2}}.get(name, {"num_hidden_layers": 2})
    spec = load_model_spec(name, small)
    meta_count, _ = count_params_on_meta(spec.hf_config)
    assert spec.num_params == meta_count


def test_aliases_resolve_to_documented_architectures():
    assert load_model_spec("70b").name == "llama-3.1-70b"
    assert load_model_spec("7B").name == "llama-2-7b"
    spec = load_model_spec("8b")
    assert (spec.layers, spec.hidden, spec.heads, spec.kv_heads, spec.ffn, spec.vocab) == (32, 4096, 32, 8, 14336, 128256)
    assert load_model_spec("1b").tied_embeddings is True


def test_overrides_change_the_architecture_before_counting():
    spec = load_model_spec("7b", {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000})
    assert spec.hf_config["hidden_size"] == 256 and spec.hf_config["model_type"] == "llama"
    assert spec.num_params == 1000 * 256 * 2 + 2 * (4 * 256 * 256 + 3 * 256 * 512 + 2 * 256) + 256
    assert spec.published_params is None


def test_local_config_json_and_directory_are_counted_on_meta(tmp_path):
    config = {"model_type": "phi3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "vocab_size": 100, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    from_dir, from_file = load_model_spec(str(tmp_path)), load_model_spec(str(tmp_path / "config.json"))
    assert from_dir.num_params == from_file.num_params == count_params_on_meta(config)[0]
    assert from_dir.layers == 2 and from_dir.hidden == 64
    assert {"qkv_proj", "gate_up_proj", "down_proj", "o_proj"} == {n for n, _, _ in from_dir.layer_linears}


def test_hf_cache_id_resolves_offline(tmp_path, monkeypatch):
    snap = tmp_path / "models--acme--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    (snap / "config.json").write_text(json.dumps(load_model_spec("gpt2", {"n_layer": 1}).hf_config))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    spec = load_model_spec("acme/tiny")
    assert spec.layers == 1 and spec.num_params == load_model_spec("gpt2", {"n_layer": 1}).num_params


def test_unknown_model_names_the_closest_aliases():
    with pytest.raises(LaunchError, match="did you mean llama-2-7b"):
        load_model_spec("lama-2-7b")


def test_malformed_config_json_is_one_sentence(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(LaunchError, match="not valid JSON"):
        load_model_spec(str(bad))
    bad.write_text(json.dumps({"hidden_size": 4}))
    with pytest.raises(LaunchError, match="no model_type"):
        load_model_spec(str(bad))


def test_lora_params_count_r_times_in_plus_out():
    spec = load_model_spec("7b")
    assert spec.lora_params(8, ["q_proj", "v_proj"]) == 32 * 8 * ((4096 + 4096) * 2)
    with pytest.raises(LaunchError, match="not a multiple of num_key_value_heads"):
        load_model_spec("7b", {"num_attention_heads": 4})
    with pytest.raises(LaunchError, match="not linear layers"):
        spec.lora_params(8, ["qproj"])


def test_an_empty_build_reads_no_weights_and_keeps_real_buffers(tmp_path):
    """FSDP ranks other than 0 build on the meta device: no weight file is read, RoPE buffers stay usable."""
    import torch

    from launcher.config import ModelSection
    from launcher.planning.plan import Plan
    from launcher.train.modeling import build_model
    from tiny_lm import tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not weights")  # reading it would fail
    plan = Plan(model=str(tmp_path), strategy="fsdp", device="cpu", precision="fp32")
    net = build_model(ModelSection(name_or_path=str(tmp_path)), plan, tokenizer, seed=0, empty=True)
    assert all(p.is_meta for p in net.parameters())
    buffers = dict(net.named_buffers())
    assert buffers and not any(b.is_meta for b in buffers.values())
    assert torch.isfinite(buffers["model.rotary_emb.inv_freq"]).all()


def test_compile_layers_compiles_every_decoder_layer_in_place():
    from launcher.config import FinetuneSection
    from launcher.train.adapters import apply_finetune_method
    from launcher.train.modeling import compile_layers
    from tiny_lm import tiny_llama

    for net in (tiny_llama(64), apply_finetune_method(tiny_llama(64), FinetuneSection(method="lora"))):
        names = list(net.state_dict())
        compile_layers(net)
        layers = [m for m in net.modules() if type(m).__name__ == "LlamaDecoderLayer"]
        assert len(layers) == 2 and all(layer._compiled_call_impl is not None for layer in layers)
        assert list(net.state_dict()) == names  # checkpoints and exports see the same names
