"""How long a checkpoint stops training, sync vs async, and how long a resume takes to its first step.

    PYTHONPATH=. python bench/checkpoint.py [--out bench/results/checkpoint-h100.json] [--dir /tmp/ckbench]
    PYTHONPATH=. python bench/checkpoint.py --smoke --out /tmp/checkpoint-smoke.json   # tiny, CPU, fp32

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
import os
import time
from pathlib import Path

from common import Shapes, gpu_name, timed, write_config, write_json


# The H100 run's shapes: the 1.1B at seq 512, micro-batch 2, on 1.5 MB of text.
SHAPES = Shapes(seq=512, micro=2, max_train_bytes=1_500_000)
NO_SAVE = {"max_steps": 1000, "save_steps": 100000, "save_total_limit": 1}  # saves only when the bench asks


def measure(shapes: Shapes, root: Path, resume: bool = True) -> dict:
    """Blocking time of a sync and an async save, and (`resume`) a new Trainer's restore and first step, in the
    real Trainer (a world of one)."""
    import torch

    from launcher.jobdir.layout import JobDir
    from launcher.jobdir.prepare import prepare_job
    from launcher.train.loop import Trainer

    root.mkdir(parents=True, exist_ok=True)
    config = write_config(root / "checkpoint.yaml", root / "cache", shapes, training=NO_SAVE)
    job = prepare_job(config, ["training.overwrite_output_dir=true"], output_dir=root / "job")
    environ = dict(os.environ)  # the Trainer's world of one sets RANK/WORLD_SIZE; later steps must not see them
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
    size = sum(f.stat().st_size for f in JobDir(job.output_dir).checkpoints.rglob("*") if f.is_file())
    saved_step = trainer.state.global_step - 3

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu_name(), "params": trainer.num_params, "checkpoint_gib": size / 2**30,
        "step_s": step_s, "blocked_sync_s": blocked_sync, "blocked_async_s": blocked_async,
        "background_s": background, "step_during_async_s": sum(steps_during) / len(steps_during),
    }
    if resume:
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        start = time.perf_counter()
        trainer = Trainer(job.output_dir)
        built = time.perf_counter() - start
        restore = timed(trainer.restore)
        first_step = timed(trainer.train_step)
        assert trainer.state.global_step == saved_step + 1
        result.update(resume_build_trainer_s=built, resume_restore_s=restore, resume_first_step_s=first_step,
                      resume_to_first_step_s=built + restore + first_step)
    trainer.close()
    os.environ.clear()
    os.environ.update(environ)
    return result


def table(result: dict) -> str:
    lines = [f"| {result['gpu']} | {result['params'] / 1e9:.2f}B params, checkpoint {result['checkpoint_gib']:.1f} GiB |"]
    for key in ("step_s", "blocked_sync_s", "blocked_async_s", "background_s", "step_during_async_s",
                "resume_build_trainer_s", "resume_restore_s", "resume_first_step_s", "resume_to_first_step_s"):
        if key in result:
            lines.append(f"| {key} | {result[key]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ckbench"))
    parser.add_argument("--out", default="bench/results/checkpoint-h100.json")
    parser.add_argument("--smoke", action="store_true", help="tiny model, seq 64, fp32, CPU")
    args = parser.parse_args()
    result = measure(Shapes.smoke() if args.smoke else SHAPES, args.dir)
    write_json(args.out, result)
    print(table(result))


if __name__ == "__main__":
    main()
