"""Under torchrun: for each ZeRO stage, build the real Trainer on a small Llama, run one step and write the bytes
DeepSpeed holds on this rank for each model state (test_zero_states.py compares them with launcher.planning.memory)."""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from launcher.train.distributed import init_distributed
from launcher.train.loop import Trainer

# Wide enough that DeepSpeed's alignment padding of the flat partitions stays far below 1 % of them.
SMALL = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False}


def write_job(job: Path, data: Path, cache: Path, strategy: str) -> None:
    job.mkdir(parents=True, exist_ok=True)
    config = {
        "model": {"name_or_path": "tinyllama-1.1b", "overrides": SMALL},
        "data": {"train_files": [str(data)], "vocab_size": 300, "block_size": 32, "cache_dir": str(cache),
                 "validation_split_percentage": 0},
        "training": {"max_steps": 1, "warmup_steps": 0, "seed": 7, "report_to": []},
    }
    plan = {"model": "tinyllama-1.1b", "strategy": strategy, "precision": "fp32", "micro_batch": 2,
            "gradient_accumulation_steps": 1, "seq_len": 32, "device": "cpu", "gpus_per_node": 2}
    (job / "config.yaml").write_text(yaml.safe_dump(config))
    (job / "plan.yaml").write_text(yaml.safe_dump(plan))


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def gradient_bytes(zero, stage: int) -> int:
    """The reduced gradient partition the optimizer step finds: ZeRO-3 accumulates into one flat buffer allocated
    at start-up; ZeRO-1/2 build theirs (averaged_gradients) at the accumulation boundary and drop it after the step."""
    if stage == 3:
        return nbytes([zero.grad_partitions_flat_buffer])
    tensors = [t for group in zero.averaged_gradients.values() if group is not None
               for t in ([group] if torch.is_tensor(group) else group)]
    return nbytes({t.data_ptr(): t for t in tensors}.values())


def model_states(trainer: Trainer, stage: int, grads: int) -> dict[str, int]:
    engine = trainer.engine.engine
    zero, params = engine.optimizer, list(engine.module.parameters())
    weights = [p.ds_tensor for p in params] if stage == 3 else params
    masters = zero.fp32_partitioned_groups_flat if stage == 3 else zero.single_partition_of_fp32_groups
    # ZeRO-3 steps its fp32 weight partition in place when the weights are fp32 already: no second copy then.
    weight_storages = {w.untyped_storage().data_ptr() for w in weights}
    if stage == 3:
        weight_storages |= {f.untyped_storage().data_ptr() for f in zero.fp16_partitioned_groups_flat}
    master_copies = [m for m in masters if m.untyped_storage().data_ptr() not in weight_storages]
    states = [v for m in masters for v in zero.optimizer.state[m].values() if torch.is_tensor(v) and v.dim() > 0]
    return {"params": sum(p.ds_numel if stage == 3 else p.numel() for p in params), "weights": nbytes(weights),
            "master": nbytes(master_copies), "optimizer_states": nbytes(states), "grads": grads}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("strategies", nargs="+")
    args = parser.parse_args()
    _, rank, _ = init_distributed()
    measured = {}
    for strategy in args.strategies:
        job, stage = args.out / strategy, int(strategy[-1])
        if rank == 0:
            write_job(job, args.data, args.out / "cache", strategy)
        dist.barrier()
        trainer = Trainer(job)
        zero, step = trainer.engine.engine.optimizer, trainer.engine.step
        seen = {}

        def measured_step(*a, **kw):  # the gradients as the optimizer step finds them
            seen["grads"] = gradient_bytes(zero, stage)
            return step(*a, **kw)

        trainer.engine.step = measured_step
        trainer.train_step()
        measured[strategy] = model_states(trainer, stage, seen["grads"])
        del trainer, zero, step, measured_step
        gc.collect()
        dist.barrier()
    (args.out / f"states-rank{rank}.json").write_text(json.dumps(measured))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
