"""llaunch's own loop (launched exactly as `llaunch run` launches it) beside HF Trainer, same model/batch/data.

    PYTHONPATH=. python bench/throughput.py [--steps 60] [--compile] [--out bench/results/throughput-h100.json]
    PYTHONPATH=. python bench/throughput.py --smoke --out /tmp/throughput-smoke.json   # tiny, CPU, fp32

TinyLlama-1.1B architecture (catalog "tinyllama-1.1b"), random init, seq 2048, micro-batch 4, bf16, one GPU.
Both sides train on the same packed token blocks (the cache `llaunch run` builds from the Python standard
library with its own 32k BPE tokenizer). Throughput is measured after warm-up steps; MFU uses the model
spec's FLOPs per token against the GPU's dense bf16 peak (989 TFLOP/s on an H100 SXM). `--compile` adds a
third row: llaunch with training.torch_compile (each decoder layer compiled; compilation falls in the warm-up).
--smoke shrinks the shapes (Shapes.smoke) and trains llaunch's Trainer in this process instead of through
torchrun: two fewer Python starts on a CPU runner, the same loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import Shapes, gpu_name, sync, write_config, write_json

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16 = 989e12


def run_llaunch(config: Path, out: Path, shapes: Shapes, precision: str | None = None) -> dict:
    """`llaunch run` as a user types it (or its Trainer in this process), with --precision if given; throughput
    from its metrics.jsonl after the warm-up windows."""
    from launcher.jobdir.layout import JobDir

    started = time.perf_counter()
    if shapes.launch == "torchrun":
        cmd = [sys.executable, "-m", "launcher", "run", str(config), "--output-dir", str(out), "--overwrite",
               *(["--precision", precision] if precision else [])]
        subprocess.run(cmd, check=True, cwd=REPO)
    else:
        from launcher.jobdir.prepare import prepare_job
        from launcher.train.loop import Trainer

        job = prepare_job(config, ["training.overwrite_output_dir=true"], output_dir=out,
                          knobs={"precision": precision} if precision else None)
        environ = dict(os.environ)
        trainer = Trainer(job.output_dir)  # a world of one: it sets RANK/WORLD_SIZE, which HF Trainer would read
        try:
            trainer.train()
        finally:
            trainer.close()
            os.environ.clear()
            os.environ.update(environ)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in JobDir(out).metrics.read_text().splitlines()]
    train = [r for r in records if "loss" in r and r["step"] > shapes.warmup_steps]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in train)
    peaks = [r["peak_memory_gib"] for r in train if "peak_memory_gib" in r]
    return {"tokens_per_s": tokens_per_s, "step_time_s": shapes.micro * shapes.seq / tokens_per_s,
            "peak_memory_gib": max(peaks) if peaks else None,
            "losses": [(r["step"], r["loss"]) for r in records if "loss" in r], "wall_s": wall}


def run_hf_trainer(job: Path, shapes: Shapes) -> dict:
    """HF Trainer (bf16=True, adamw_torch_fused, sdpa) on the blocks llaunch trained on."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from launcher.config import TrainConfig
    from launcher.corpus import PackedBlocks, find_corpus
    from launcher.jobdir.layout import JobDir
    from launcher.train.modeling import architecture_config

    config = TrainConfig.load(JobDir(job).config)
    corpus = find_corpus(config.data)
    blocks = PackedBlocks(corpus.tokens(), shapes.seq, 0)

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
            sync()
            self.times.append(time.perf_counter())

    timer = StepTimer()
    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(job / "hf"), bf16=shapes.bf16, optim="adamw_torch_fused" if shapes.bf16 else "adamw_torch",
        per_device_train_batch_size=shapes.micro, use_cpu=not cuda,
        gradient_accumulation_steps=1, learning_rate=3e-4, warmup_steps=10, lr_scheduler_type="cosine",
        weight_decay=0.1, max_grad_norm=1.0, max_steps=shapes.steps, logging_steps=min(5, shapes.warmup_steps),
        save_strategy="no", report_to=[], seed=0, dataloader_pin_memory=cuda, disable_tqdm=True,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[timer])
    trainer.train()
    deltas = np.diff(timer.times)[shapes.warmup_steps:]
    step = float(np.median(deltas))
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return {"tokens_per_s": shapes.micro * shapes.seq / step, "step_time_s": step,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "losses": losses}


def compare(shapes: Shapes, work: Path, compile_layers: bool, save=lambda result: None) -> dict:
    """llaunch, HF Trainer (and llaunch compiled) on the same model, batch and blocks, in that order;
    `save(result)` once the first two are in and again after the third."""
    import torch

    from launcher.jobdir.layout import JobDir
    from launcher.planning.models import load_model_spec

    work.mkdir(parents=True, exist_ok=True)
    job = work / "llaunch"
    ours = run_llaunch(write_config(work / "bench.yaml", work / "cache", shapes), job, shapes)
    theirs = run_hf_trainer(job, shapes)
    vocab = json.loads((JobDir(job).final / "config.json").read_text())["vocab_size"]
    flops_per_token = load_model_spec(shapes.model, {**shapes.overrides, "vocab_size": vocab}).flops_per_token(shapes.seq)
    cuda = torch.cuda.is_available()

    def mfu(tokens_per_s: float) -> float | None:  # against the bf16 peak: meaningful only on the GPU
        return tokens_per_s * flops_per_token / PEAK_BF16 if cuda else None

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu_name(), "torch": torch.__version__,
        "config": {**dataclasses.asdict(shapes), "precision": "bf16" if shapes.bf16 else "fp32",
                   "flops_per_token": flops_per_token, "peak_flops": PEAK_BF16},
        "tokens_per_s": ours["tokens_per_s"], "mfu": mfu(ours["tokens_per_s"]), "step_time_s": ours["step_time_s"],
        "peak_memory_gib": ours["peak_memory_gib"], "wall_s": ours["wall_s"],
        "hf_trainer_tokens_per_s": theirs["tokens_per_s"], "hf_trainer_mfu": mfu(theirs["tokens_per_s"]),
        "hf_trainer_step_time_s": theirs["step_time_s"], "hf_trainer_peak_memory_gib": theirs["peak_memory_gib"],
        "speedup_vs_hf_trainer": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "losses": {"llaunch": ours["losses"], "hf_trainer": theirs["losses"]},
    }
    save(result)
    if compile_layers:
        compiled = run_llaunch(write_config(work / "bench-compiled.yaml", work / "cache", shapes,
                                            training={"torch_compile": True}), work / "llaunch-compiled", shapes)
        result["compiled"] = {**{k: compiled[k] for k in ("tokens_per_s", "step_time_s", "peak_memory_gib",
                                                          "losses", "wall_s")},
                              "mfu": mfu(compiled["tokens_per_s"]),
                              "speedup_vs_hf_trainer": compiled["tokens_per_s"] / theirs["tokens_per_s"]}
        save(result)
    print(table(result))
    return result


def table(result: dict) -> str:
    c = result["config"]
    lines = [f"\n{c['model']} random init, seq {c['seq']}, micro-batch {c['micro']}, {c['precision']}, "
             f"{result['gpu']}; MFU vs {PEAK_BF16 / 1e12:.0f} TFLOP/s",
             f"{'':<16} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9} {'step s':>8} {'vs HF':>6}"]
    rows = {"llaunch run": (result["tokens_per_s"], result["mfu"], result["peak_memory_gib"], result["step_time_s"],
                            result["speedup_vs_hf_trainer"]),
            "HF Trainer": (result["hf_trainer_tokens_per_s"], result["hf_trainer_mfu"],
                           result["hf_trainer_peak_memory_gib"], result["hf_trainer_step_time_s"], 1.0)}
    if "compiled" in result:
        r = result["compiled"]
        rows["llaunch compiled"] = (r["tokens_per_s"], r["mfu"], r["peak_memory_gib"], r["step_time_s"],
                                    r["speedup_vs_hf_trainer"])
    for name, (tps, mfu, peak, step, speedup) in rows.items():
        lines.append(f"{name:<16} {tps:>10,.0f} {_fmt(mfu, '.1%'):>7} {_fmt(peak, '.1f'):>9} {step:>8.3f} {speedup:>5.2f}x")
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=Shapes.steps)
    parser.add_argument("--warmup-steps", type=int, default=Shapes.warmup_steps)
    parser.add_argument("--compile", action="store_true", help="also run llaunch with training.torch_compile")
    parser.add_argument("--smoke", action="store_true", help="tiny model, seq 64, fp32, CPU, in-process Trainer")
    parser.add_argument("--work", type=Path, default=Path("/tmp/llaunch-bench"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "throughput-h100.json")
    args = parser.parse_args()
    shapes = Shapes.smoke() if args.smoke else Shapes(steps=args.steps, warmup_steps=args.warmup_steps)
    compare(shapes, args.work, args.compile, save=lambda result: write_json(args.out, result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
