"""How long a checkpoint stops training, sync vs async, and how long a resume takes to its first step.

    PYTHONPATH=. python bench/checkpoint.py [--out bench/results/checkpoint-h100.json] [--dir /tmp/ckbench]

TinyLlama-1.1B architecture (catalog "tinyllama-1.1b", 32k BPE vocab trained on stdlib text), bf16 autocast,
fp32 master weights + AdamW state, one GPU (DDP engine, world of one), in the real Trainer:
  blocked_sync_s   Trainer.save_checkpoint() with async_save off: DCP write + fsync + sha256 + publish
  blocked_async_s  the same call with async_save on: the loop waits only for the copy to host memory
  background_s     until the async checkpoint is published (Checkpointer.wait())
  step_s / step_during_async_s  a training step alone / while the async save writes behind it
  resume_to_first_step_s  new Trainer (model build) + restore (verify checksums, DCP load) + one step
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time
from pathlib import Path

import torch
import yaml

SEQ, MICRO = 512, 2


def write_config(path: Path, cache: Path) -> Path:
    config = {
        "model": {"name_or_path": "tinyllama-1.1b", "attn_implementation": "sdpa"},
        "data": {"train_files": ["@stdlib"], "file_pattern": "*.py", "max_train_bytes": 1_500_000,
                 "vocab_size": 32000, "block_size": SEQ, "validation_split_percentage": 0, "cache_dir": str(cache)},
        "training": {"bf16": True, "learning_rate": 3e-4, "max_steps": 1000, "per_device_train_batch_size": MICRO,
                     "gradient_accumulation_steps": 1, "gradient_checkpointing": False, "save_total_limit": 1,
                     "save_steps": 100000, "report_to": [], "seed": 0},
        "parallel": {"strategy": "ddp", "nproc_per_node": 1},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/ckbench")
    parser.add_argument("--out", default="bench/results/checkpoint-h100.json")
    args = parser.parse_args()
    from launcher.job import prepare_job
    from launcher.train.loop import Trainer

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    job = prepare_job(write_config(root / "config.yaml", root / "cache"), ["training.overwrite_output_dir=true"],
                      output_dir=root / "job")
    trainer = Trainer(job.output_dir)
    for _ in range(3):  # warm-up; creates the AdamW state a checkpoint must hold
        trainer.train_step()
    step_s = min(timed(trainer.train_step) for _ in range(3))

    trainer.checkpointer.async_save = False
    blocked_sync = timed(trainer.save_checkpoint)
    trainer.train_step()

    trainer.checkpointer.async_save = True
    blocked_async = timed(trainer.save_checkpoint)
    start = time.perf_counter()
    steps_during = [timed(trainer.train_step) for _ in range(3)]
    trainer.checkpointer.wait()
    background = blocked_async + time.perf_counter() - start
    size = sum(f.stat().st_size for f in (job.output_dir / "checkpoints").rglob("*") if f.is_file())
    saved_step = trainer.state.global_step - 3

    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    start = time.perf_counter()
    resumed = Trainer(job.output_dir)
    built = time.perf_counter() - start
    restore = timed(resumed.restore)
    first_step = timed(resumed.train_step)
    assert resumed.state.global_step == saved_step + 1

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(), "params": resumed.num_params, "checkpoint_gib": size / 2**30,
        "step_s": step_s, "blocked_sync_s": blocked_sync, "blocked_async_s": blocked_async,
        "background_s": background, "step_during_async_s": sum(steps_during) / len(steps_during),
        "resume_build_trainer_s": built, "resume_restore_s": restore, "resume_first_step_s": first_step,
        "resume_to_first_step_s": built + restore + first_step,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"| {result['gpu']} | {result['params'] / 1e9:.2f}B params, checkpoint {result['checkpoint_gib']:.1f} GiB |")
    for key in ("step_s", "blocked_sync_s", "blocked_async_s", "background_s", "step_during_async_s",
                "resume_build_trainer_s", "resume_restore_s", "resume_first_step_s", "resume_to_first_step_s"):
        print(f"| {key} | {result[key]:.2f} |")
    resumed.close()


if __name__ == "__main__":
    main()
