"""`llaunch export` of a LoRA run's checkpoint, through the real CLI: a tiny `llaunch run`, then the adapter alone
(PEFT's format, loadable by AutoPeftModelForCausalLM) and the merged model, for a random-init base and for a
local base whose path has a space and a non-ASCII letter. The merged weights are the checkpoint's base plus
B @ A * alpha / r, the exported adapter is the one the run itself saved in final/, and both exports give the
same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from examples import arithmetic
from launcher.cli import main
from launcher.train.export import load_model_state
from launcher.train.sft import format_prompt
from tests.tiny_run import tiny_run_config

LORA = {"method": "lora", "r": 4, "lora_alpha": 8}
TRAINING = {"max_steps": 2, "save_steps": 2, "learning_rate": 1e-2, "report_to": []}


def random_init_config(root: Path) -> Path:
    path = tiny_run_config(root, training=TRAINING)
    config = yaml.safe_load(path.read_text())
    config["finetune"] = LORA
    path.write_text(yaml.safe_dump(config))
    return path


def local_base_config(root: Path) -> Path:
    records = arithmetic.make_records(40, seed=0, max_operand=9)
    arithmetic.write_jsonl(records, root / "data.jsonl")
    texts = [format_prompt(r["instruction"]) + r["output"] for r in records]
    base = arithmetic.make_base_model(root / "my base é", texts, hidden_size=32, layers=2)
    config = {"model": {"name_or_path": str(base)}, "finetune": LORA,
              "data": {"dataset_format": "alpaca", "train_files": ["data.jsonl"], "block_size": 64},
              "training": {**TRAINING, "per_device_train_batch_size": 2}}
    (root / "sft.yaml").write_text(yaml.safe_dump(config))
    return root / "sft.yaml"


def merged_by_hand(checkpoint: Path, scale: float = LORA["lora_alpha"] / LORA["r"]) -> dict[str, torch.Tensor]:
    """W + B @ A * alpha / r from the checkpoint's raw tensors, named as in the plain model."""
    state, _ = load_model_state(checkpoint)
    merged = {}
    for key, tensor in state.items():
        if ".lora_" in key:
            continue
        name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        lora = key.replace(".base_layer.weight", ".lora_{}.default.weight")
        merged[name] = tensor + state[lora.format("B")] @ state[lora.format("A")] * scale if lora != key else tensor
    return merged


@pytest.mark.parametrize("make_config", [random_init_config, local_base_config], ids=["random-init", "local-base"])
def test_a_lora_checkpoint_exports_as_its_adapter_and_merged(tmp_path, make_config):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert main(["run", str(make_config(tmp_path)), "--output-dir", str(run)]) == 0
    checkpoint = run / "checkpoints" / "step-2"
    assert sorted(p.name for p in (checkpoint / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    adapter, merged = tmp_path / "adapter é", tmp_path / "merged"
    assert main(["export", str(checkpoint), "--to", str(adapter)]) == 0
    assert main(["export", str(checkpoint), "--to", str(merged), "--merge"]) == 0

    expected = merged_by_hand(checkpoint)
    got = load_file(merged / "model.safetensors")
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, msg=name)
    frozen = merged_by_hand(checkpoint, scale=0.0)
    assert any(not torch.equal(got[name], frozen[name]) for name in got)  # training moved the LoRA weights
    trained = load_file(run / "final" / "adapter_model.safetensors")  # what the run itself saved at its last step
    exported = load_file(adapter / "adapter_model.safetensors")
    assert exported.keys() == trained.keys() and all(exported[k].equal(trained[k]) for k in trained)

    peft_model = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    tokens = torch.randint(0, plain.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tokens).logits, plain(tokens).logits, rtol=1e-4, atol=1e-5)
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(adapter / "base") if make_config is random_init_config else Path(base).name == "my base é"
