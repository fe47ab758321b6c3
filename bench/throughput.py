"""llaunch's own loop (launched exactly as `llaunch run` launches it) beside HF Trainer, same model/batch/data.

    PYTHONPATH=. python bench/throughput.py [--steps 60] [--compile] [--out bench/results/throughput-h100.json]

TinyLlama-1.1B architecture (catalog "tinyllama-1.1b"), random init, seq 2048, micro-batch 4, bf16, one GPU.
Both sides train on the same packed token blocks (the cache `llaunch run` builds from the Python standard
library with its own 32k BPE tokenizer). Throughput is measured after warm-up steps; MFU uses the model
spec's FLOPs per token against the GPU's dense bf16 peak (989 TFLOP/s on an H100 SXM). `--compile` adds a
third row: llaunch with training.torch_compile (each decoder layer compiled; compilation falls in the warm-up).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODEL, SEQ, MICRO, PEAK_BF16 = "tinyllama-1.1b", 2048, 4, 989e12


def write_config(path: Path, cache: Path, steps: int, compile_layers: bool = False) -> Path:
    config = {
        "model": {"name_or_path": MODEL, "attn_implementation": "sdpa"},
        "data": {"train_files": ["@stdlib"], "file_pattern": "*.py", "max_train_bytes": 12_000_000,
                 "vocab_size": 32000, "block_size": SEQ, "validation_split_percentage": 0,
                 "cache_dir": str(cache)},
        "training": {"bf16": True, "optim": "adamw_torch_fused", "learning_rate": 3e-4, "warmup_steps": 10,
                     "max_steps": steps, "per_device_train_batch_size": MICRO, "gradient_accumulation_steps": 1,
                     "gradient_checkpointing": False, "logging_steps": 5, "seed": 0, "report_to": [],
                     "torch_compile": compile_layers},
        "parallel": {"strategy": "ddp", "nproc_per_node": 1},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run_llaunch(config: Path, out: Path, warmup_steps: int) -> dict:
    """`llaunch run` as a user types it; throughput from its metrics.jsonl after the warm-up windows."""
    cmd = [sys.executable, "-m", "launcher", "run", str(config), "--output-dir", str(out), "--overwrite"]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r and r["step"] > warmup_steps]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in train)
    return {"tokens_per_s": tokens_per_s, "step_time_s": MICRO * SEQ / tokens_per_s,
            "peak_memory_gib": max(r.get("peak_memory_gib", 0.0) for r in train),
            "losses": [(r["step"], r["loss"]) for r in records if "loss" in r], "wall_s": wall}


def run_hf_trainer(job: Path, steps: int, warmup_steps: int) -> dict:
    """HF Trainer (bf16=True, adamw_torch_fused, sdpa) on the blocks llaunch trained on."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from launcher.config import TrainConfig
    from launcher.train.data import PackedBlocks, find_corpus
    from launcher.train.modeling import architecture_config

    config = TrainConfig.load(job / "config.yaml")
    corpus = find_corpus(config.data)
    blocks = PackedBlocks(corpus.tokens(), SEQ, 0)

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return blocks.num_train

        def __getitem__(self, i):
            ids = torch.from_numpy(blocks.train_block(i))
            return {"input_ids": ids, "labels": ids}

    torch.manual_seed(0)
    hf_config = AutoConfig.for_model(**architecture_config(config.model, corpus.meta["vocab_size"]))
    # fp32 master weights, as bf16=True means in TrainingArguments (transformers 5 would otherwise take the
    # catalog config's bf16 dtype and train pure-bf16 weights, which is a different recipe).
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    timer = StepTimer()
    args = TrainingArguments(
        output_dir=str(job / "hf"), bf16=True, optim="adamw_torch_fused", per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=1, learning_rate=3e-4, warmup_steps=10, lr_scheduler_type="cosine",
        weight_decay=0.1, max_grad_norm=1.0, max_steps=steps, logging_steps=5, save_strategy="no",
        report_to=[], seed=0, dataloader_pin_memory=True, disable_tqdm=True,
    )
    torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[timer])
    trainer.train()
    deltas = np.diff(timer.times)[warmup_steps:]
    step = float(np.median(deltas))
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return {"tokens_per_s": MICRO * SEQ / step, "step_time_s": step,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also run llaunch with training.torch_compile")
    parser.add_argument("--work", type=Path, default=Path("/tmp/llaunch-bench"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "throughput-h100.json")
    args = parser.parse_args()
    import torch

    from launcher.models import load_model_spec

    args.work.mkdir(parents=True, exist_ok=True)
    job = args.work / "llaunch"
    config = write_config(args.work / "bench.yaml", args.work / "cache", args.steps)
    ours = run_llaunch(config, job, args.warmup_steps)
    theirs = run_hf_trainer(job, args.steps, args.warmup_steps)

    vocab = json.loads((job / "final" / "config.json").read_text())["vocab_size"]
    flops_per_token = load_model_spec(MODEL, {"vocab_size": vocab}).flops_per_token(SEQ)
    gpu = torch.cuda.get_device_name()
    rows = {"llaunch run": ours, "HF Trainer": theirs}
    if args.compile:
        compiled = write_config(args.work / "bench-compiled.yaml", args.work / "cache", args.steps, compile_layers=True)
        rows["llaunch compiled"] = run_llaunch(compiled, args.work / "llaunch-compiled", args.warmup_steps)
    print(f"\n{MODEL} random init, seq {SEQ}, micro-batch {MICRO}, bf16, {gpu}; MFU vs {PEAK_BF16 / 1e12:.0f} TFLOP/s")
    print(f"{'':<16} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9} {'step s':>8}")
    for name, r in rows.items():
        r["mfu"] = r["tokens_per_s"] * flops_per_token / PEAK_BF16
        print(f"{name:<16} {r['tokens_per_s']:>10,.0f} {r['mfu']:>7.1%} {r['peak_memory_gib']:>9.1f} {r['step_time_s']:>8.3f}")
    for name, r in rows.items():
        if name != "HF Trainer":
            print(f"{name} vs HF Trainer: {r['tokens_per_s'] / theirs['tokens_per_s']:.2f}x")
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu, "torch": torch.__version__,
        "config": {"model": MODEL, "seq_len": SEQ, "micro_batch": MICRO, "precision": "bf16", "steps": args.steps,
                   "warmup_steps_excluded": args.warmup_steps, "flops_per_token": flops_per_token,
                   "peak_flops": PEAK_BF16},
        "tokens_per_s": ours["tokens_per_s"], "mfu": ours["mfu"], "step_time_s": ours["step_time_s"],
        "peak_memory_gib": ours["peak_memory_gib"],
        "hf_trainer_tokens_per_s": theirs["tokens_per_s"], "hf_trainer_mfu": theirs["mfu"],
        "hf_trainer_step_time_s": theirs["step_time_s"], "hf_trainer_peak_memory_gib": theirs["peak_memory_gib"],
        "losses": {"llaunch": ours["losses"], "hf_trainer": theirs["losses"]},
    }
    if args.compile:
        result["compiled"] = {k: rows["llaunch compiled"][k] for k in ("tokens_per_s", "mfu", "step_time_s",
                                                                        "peak_memory_gib", "losses")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
