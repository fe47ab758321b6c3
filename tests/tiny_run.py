"""The tiny random-init Llama and the small code corpus that training tests share (nothing is downloaded).

Importable from every tier and from torchrun workers as `tests.tiny_run` (pytest's pythonpath and the
workers' PYTHONPATH both hold the repository root)."""

from __future__ import annotations

from pathlib import Path

import yaml

# The catalog's TinyLlama shrunk to two 32-wide layers: a step takes milliseconds on one CPU core.
TINY_LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2}
CODE_TEXT = "def add(a, b):\n    return a + b\n\n" * 400


def tiny_run_config(folder: Path, *, cache_dir: Path | None = None, model: dict | None = None,
                    data: dict | None = None, training: dict | None = None) -> Path:
    """folder/corpus.txt and folder/tiny.yaml, a pretraining config for TINY_LLAMA on it; `model` adds to the
    architecture overrides, `data` and `training` to their sections."""
    (folder / "corpus.txt").write_text(CODE_TEXT)
    config = {
        "model": {"name_or_path": "tinyllama-1.1b", "overrides": {**TINY_LLAMA, **(model or {})}},
        "data": {"train_files": ["corpus.txt"], "vocab_size": 280, "block_size": 32,
                 "cache_dir": str(cache_dir or folder / "cache"), **(data or {})},
        "training": {"per_device_train_batch_size": 2, **(training or {})},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def padded_batch(examples, pad_token_id: int) -> dict:
    """Reference batch for SFT loss checks: each example alone in a right-padded row with an attention mask,
    the way a plain (unpacked, untrimmed) fine-tuning script feeds a model."""
    import torch

    from launcher.train.sft import IGNORE_INDEX

    length = -(-max(len(ex.input_ids) for ex in examples) // 8) * 8
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n], labels[row, :n] = torch.tensor(ex.input_ids), torch.tensor(ex.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
