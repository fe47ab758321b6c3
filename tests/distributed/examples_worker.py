"""Under torchrun: train each prepared job directory named on the command line with the real Trainer, one
after another in one process group (a torchrun start per job would cost more than the training), and write
each job's exit code to OUT (rank 0)."""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch.distributed as dist

from launcher.train.distributed import init_distributed
from launcher.train.loop import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("jobs", nargs="+", type=Path)
    args = parser.parse_args()
    _, rank, _ = init_distributed()
    codes = {}
    for job in args.jobs:
        trainer = Trainer(job)
        codes[job.name] = trainer.train()
        trainer.preemption.uninstall()
        del trainer
        gc.collect()
        dist.barrier()
    if rank == 0:
        args.out.write_text(json.dumps(codes))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
