"""QLoRA through `llaunch run`: tokens/s and peak memory of a 4-bit base with LoRA adapters, one GPU.

    PYTHONPATH=. python bench/qlora.py --out bench/results/qlora-h200.json
    PYTHONPATH=. python bench/qlora.py --smoke --out /tmp/qlora-smoke.json   # tiny; skipped without CUDA

QLoRA quantizes pretrained weights, so each base (the TinyLlama-1.1B and Llama-3.1-8B architectures) is
random-initialised once, saved in bf16 as a model directory, and trained from there: nf4 + double quant,
r=16 on every linear, checkpointing (prepare_model_for_kbit_training turns it on), bf16 compute, seq 2048,
the stdlib blocks bench/throughput.py trains on. Without CUDA the configs are still written and validated,
and the rows are skipped with llaunch's own sentence.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import throughput
from common import (GPU_CHECK_TRAIN_BYTES, TINY_LLAMA, Shapes, Skipped, random_pretrained, write_config,
                    write_json)

FINETUNE = {"method": "qlora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0}


@dataclass
class QLoRAShapes:
    """Which bases QLoRA trains (label, catalog architecture, overrides) and how long; a label names the random
    model's directory, random-<label>, which bench/memory_truth.py's row of the same size shares."""

    bases: list = field(default_factory=lambda: [("llama-1.1b", "tinyllama-1.1b", {}),
                                                 ("llama-3.1-8b", "llama-3.1-8b", {})])
    train: Shapes = field(default_factory=lambda: Shapes(steps=15, warmup_steps=5,
                                                          max_train_bytes=GPU_CHECK_TRAIN_BYTES))

    @classmethod
    def smoke(cls) -> "QLoRAShapes":
        return cls(bases=[("tiny", "tinyllama-1.1b", TINY_LLAMA)], train=Shapes.smoke())


def measure(shapes: QLoRAShapes, work: Path, save=lambda rows: None) -> list[dict]:
    """One row per base; `save(rows)` after each, so a stopped run keeps what it finished."""
    from launcher.config import FinetuneSection, TrainConfig
    from launcher.train.adapters import quantization_config

    work.mkdir(parents=True, exist_ok=True)
    configs = {}
    for label, base, overrides in shapes.bases:
        model_dir = work / f"random-{label}"
        # prepare_model_for_kbit_training checkpoints every layer: the plan says so too
        configs[label] = write_config(work / f"qlora-{label}.yaml", work / "cache", shapes.train,
                                      training={"gradient_checkpointing": True}, finetune=FINETUNE,
                                      model=str(model_dir))
        TrainConfig.load(configs[label])  # keys and values checked here too, so the GPU run cannot rot
    try:
        quantization_config(FinetuneSection(**FINETUNE))
    except Exception as err:  # LaunchError: no CUDA or no bitsandbytes, in llaunch's words
        raise Skipped(str(err)) from None
    rows = []
    for label, base, overrides in shapes.bases:
        random_pretrained(base, overrides, work / f"random-{label}")
        result = throughput.run_llaunch(configs[label], work / f"qlora-{label}-run", shapes.train)
        rows.append({"base": label, "architecture": base, "overrides": overrides,
                     "shapes": dataclasses.asdict(shapes.train), **result})
        peak = result["peak_memory_gib"]  # None on CPU, where NF4 runs too (bitsandbytes >= 0.49)
        print(f"QLoRA {label}: {result['tokens_per_s']:,.0f} tokens/s, peak "
              f"{'not measured (no CUDA)' if peak is None else f'{peak:.1f} GiB'}", flush=True)
        save(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/llaunch-bench"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/qlora-h200.json"))
    args = parser.parse_args()
    try:
        write_json(args.out, measure(QLoRAShapes.smoke() if args.smoke else QLoRAShapes(), args.work,
                                     save=lambda rows: write_json(args.out, rows)))
    except Skipped as why:
        raise SystemExit(f"skipped: {why}") from None


if __name__ == "__main__":
    main()
