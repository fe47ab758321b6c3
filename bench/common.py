"""What the bench scripts share: the shapes and config of a benchmarked llaunch run, the device, step timing, a
skipped row, JSON written as it grows, and a random-init model saved as a pretrained directory (QLoRA quantizes
only pretrained weights)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 512}  # --smoke: a Llama that trains in milliseconds on a CPU
# The GPU check's steps share one token cache under its --work: 3 MB of stdlib text is ~0.8M tokens, more than
# 40 steps of 4 x 2048 take, and its 32k BPE trains in seconds.
GPU_CHECK_TRAIN_BYTES = 3_000_000
NO_CUDA_PEAK = "peak CUDA memory needs a GPU; this CPU run reports step time and loss only"


@dataclass
class Shapes:
    """The model, batch and data of one benchmarked llaunch run; the defaults are the H100 throughput run's
    (bench/results/throughput-h100.json). --smoke shrinks them to Shapes.smoke()."""

    model: str = "tinyllama-1.1b"
    overrides: dict = field(default_factory=dict)
    seq: int = 2048
    micro: int = 4
    steps: int = 60
    warmup_steps: int = 10  # excluded from the throughput
    max_train_bytes: int = 12_000_000
    vocab_size: int = 32000
    bf16: bool = True
    launch: str = "torchrun"  # torchrun: `llaunch run` as a user types it; in-process: the same Trainer, here

    @classmethod
    def smoke(cls) -> "Shapes":
        return cls(overrides={k: v for k, v in TINY_LLAMA.items() if k != "vocab_size"}, seq=64, micro=2, steps=6,
                   warmup_steps=2, max_train_bytes=300_000, vocab_size=TINY_LLAMA["vocab_size"], bf16=False,
                   launch="in-process")


def write_config(path: Path, cache: Path, shapes: Shapes, training: dict | None = None,
                 finetune: dict | None = None, model: str | None = None) -> Path:
    """The train config of a benchmarked run on Python's own source; `model` a pretrained directory instead of
    the architecture (its overrides then do not apply), `training` keys over the defaults here."""
    config = {
        "model": {"name_or_path": model or shapes.model, "attn_implementation": "sdpa",
                  "overrides": {} if model else shapes.overrides},
        "data": {"train_files": ["@stdlib"], "file_pattern": "*.py", "max_train_bytes": shapes.max_train_bytes,
                 "vocab_size": shapes.vocab_size, "block_size": shapes.seq, "validation_split_percentage": 0,
                 "cache_dir": str(cache)},
        "training": {"bf16": shapes.bf16, "optim": "adamw_torch_fused" if shapes.bf16 else "adamw_torch",
                     "learning_rate": 3e-4, "warmup_steps": 10, "max_steps": shapes.steps,
                     "per_device_train_batch_size": shapes.micro, "gradient_accumulation_steps": 1,
                     "gradient_checkpointing": False, "logging_steps": min(5, shapes.warmup_steps), "seed": 0,
                     "report_to": [], **(training or {})},
        "parallel": {"strategy": "ddp", "nproc_per_node": 1},
        "finetune": finetune or {},
    }
    path.write_text(yaml.safe_dump(config))
    return path


class Skipped(Exception):
    """A row that cannot run here (no GPU, no bitsandbytes): recorded with its reason, never faked."""


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def write_json(path: str | Path, data) -> None:
    """Atomic, so a step killed at its time budget leaves the rows it finished, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def random_pretrained(base: str, overrides: dict, directory: Path) -> Path:
    """Save a random-init model of this architecture in bf16 (built on the GPU where there is one); reused."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.planning.models import load_model_spec

    if (directory / "config.json").exists():
        return directory
    config = AutoConfig.for_model(**load_model_spec(base, overrides).hf_config)
    torch.manual_seed(0)
    with device():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = directory.with_name(directory.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(directory)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the 8B's 16 GB would otherwise stay reserved here while llaunch trains on it
    return directory
