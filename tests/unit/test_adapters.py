"""PEFT methods: LoRA trains only adapter weights, saves alone, reloads to the same outputs, merges for export."""

import pytest
import torch

from launcher.config import FinetuneSection, TrainConfig
from launcher.errors import LaunchError
from launcher.train import adapters
from tiny_lm import tiny_llama


def saved_base(tmp_path, seed=0):
    base = tiny_llama(64, seed=seed)
    base.save_pretrained(tmp_path / "base")
    return base, tmp_path / "base"


def train_a_bit(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return ids


def test_lora_trains_only_adapter_weights_and_reloads_to_the_same_outputs(tmp_path):
    base, base_dir = saved_base(tmp_path)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = adapters.apply_finetune_method(base, FinetuneSection(method="lora", r=4, lora_dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # all-linear: every projection of every layer, never the output head.
    assert any("q_proj" in n for n in trainable) and any("down_proj" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)
    ids = train_a_bit(model)
    base_now = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(frozen[k], base_now[k]) for k in frozen)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    adapters.save_pretrained(model, tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size < 0.5 * (base_dir / "model.safetensors").stat().st_size
    reloaded = adapters.load_with_adapter(base_dir, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)
        plain = tiny_llama(64)(input_ids=ids).logits
    assert not torch.allclose(plain, expected, atol=1e-3)  # the adapter changed the model


def test_lora_keys_reach_peft(tmp_path):
    base, _ = saved_base(tmp_path)
    cfg = FinetuneSection(method="lora", r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                         modules_to_save=["lm_head"], bias="lora_only")
    model = adapters.apply_finetune_method(base, cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all(".layers.1." in n and ("q_proj" in n or "v_proj" in n) for n in lora)
    assert any("lm_head" in n and "modules_to_save" in n for n in trainable)


def test_prefix_tuning_trains_only_the_prefix(tmp_path):
    base, _ = saved_base(tmp_path)
    model = adapters.apply_finetune_method(base, FinetuneSection(method="prefix", num_virtual_tokens=5))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("prompt_encoder" in n for n in trainable)
    ids = train_a_bit(model, steps=1)
    assert model(input_ids=ids, labels=ids).loss.isfinite()


def test_merged_lora_export_matches_the_adapter(tmp_path):
    base, base_dir = saved_base(tmp_path)
    model = adapters.apply_finetune_method(base, FinetuneSection(method="lora", r=4, lora_dropout=0.0))
    ids = train_a_bit(model)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    adapters.save_pretrained(model, tmp_path / "adapter")
    adapters.merge_adapter(tmp_path / "adapter", tmp_path / "merged", base=base_dir)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4)


def test_qlora_stores_its_4bit_weights_as_bf16_and_trains_on_cpu(tmp_path):
    """bitsandbytes NF4 on CPU; bf16 quant storage is what lets FSDP2 shard the packed weights."""
    from transformers import AutoModelForCausalLM

    _, base_dir = saved_base(tmp_path)
    config = adapters.quantization_config(FinetuneSection(method="qlora"))
    assert config.bnb_4bit_quant_storage == torch.bfloat16
    net = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16, quantization_config=config,
                                               device_map={"": "cpu"})
    packed = net.model.layers[0].self_attn.q_proj.weight
    assert type(packed).__name__ == "Params4bit" and packed.dtype == torch.bfloat16
    model = adapters.apply_finetune_method(net, FinetuneSection(method="qlora", r=2, lora_dropout=0.0))
    train_a_bit(model, steps=1)

    # An eval forward without grad must not repack the 4-bit weights in place (bitsandbytes does on CPUs with
    # AVX512-BF16): FSDP owns that storage and checkpoints save its layout.
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    before = packed.data.clone()
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    assert packed.dtype == torch.bfloat16 and torch.equal(packed.data, before)


@pytest.mark.parametrize("mode", ["none", "selective"])
def test_qlora_keeps_the_recompute_the_plan_chose(tmp_path, mode):
    """build_model applies the plan's recompute before the adapters; PEFT's kbit preparation must not replace it
    with reentrant checkpointing of every layer (what it does when asked to checkpoint)."""
    from transformers import AutoModelForCausalLM

    from launcher.train.recompute import enable_recompute

    _, base_dir = saved_base(tmp_path)
    net = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16, device_map={"": "cpu"},
                                               quantization_config=adapters.quantization_config(FinetuneSection(method="qlora")))
    enable_recompute(net, mode)
    model = adapters.apply_finetune_method(net, FinetuneSection(method="qlora", r=2, lora_dropout=0.0))
    layer = model.get_base_model().model.layers[0]
    if mode == "none":
        assert not layer.gradient_checkpointing
    else:
        checkpoint = layer._gradient_checkpointing_func
        assert checkpoint.keywords["use_reentrant"] is False and checkpoint.keywords["context_fn"].func.__name__ == "selective_contexts"
    train_a_bit(model, steps=1)


def test_bad_finetune_keys_fail_in_the_config():
    with pytest.raises(LaunchError, match="finetune.method 'lora2'"):
        TrainConfig.from_dict({"finetune": {"method": "lora2"}})
    with pytest.raises(LaunchError, match="did you mean 'lora_alpha'"):
        TrainConfig.from_dict({"finetune": {"lora_alhpa": 8}})
    with pytest.raises(LaunchError, match="set data.packing: false"):
        TrainConfig.from_dict({"finetune": {"method": "prefix"}, "data": {"dataset_format": "alpaca"}})


def test_unknown_target_module_is_one_sentence(tmp_path):
    base, _ = saved_base(tmp_path)
    with pytest.raises(LaunchError, match="finetune settings do not fit"):
        adapters.apply_finetune_method(base, FinetuneSection(method="lora", target_modules=["qkv_proj"]))


def test_a_rank_fine_tunes_as_planned_and_keeps_the_configs_other_peft_keys():
    from launcher.planning.plan import Plan

    plan = Plan(model="m", method="lora", lora_r=4, lora_targets=["q_proj"])
    cfg = FinetuneSection(method="lora", r=16, lora_dropout=0.1)
    ran = adapters.as_planned(cfg, plan)
    assert (ran.method, ran.r, ran.target_modules, ran.lora_dropout) == ("lora", 4, ["q_proj"], 0.1)
    prefix = FinetuneSection(method="prefix", num_virtual_tokens=8)
    assert adapters.as_planned(prefix, plan) is prefix  # the planner sizes prefix tuning as full
