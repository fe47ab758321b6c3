"""Under torchrun: for each strategy:micro:accum, build the real Trainer on a tiny model, run a few steps,
write each step's mean loss and the consolidated weights (rank 0). test_engines.py compares them."""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import save_file

from launcher.train.distributed import init_distributed
from launcher.train.loop import Trainer
from tests.tiny_run import TINY_LLAMA

TINY = {**TINY_LLAMA, "max_position_embeddings": 64}


def write_job(job: Path, data: Path, cache: Path, strategy: str, micro: int, accum: int, steps: int,
              option: str, world: int, learning_rate: float = 1e-2) -> None:
    """`option`: one of the worker's options, or several joined by '+' (tied+tp2)."""
    options = set(option.split("+"))
    job.mkdir(parents=True, exist_ok=True)
    config = {
        "model": {"name_or_path": "tinyllama-1.1b", "overrides": {**TINY, "tie_word_embeddings": "tied" in options}},
        "data": {"train_files": [str(data)], "vocab_size": 300, "block_size": 32, "cache_dir": str(cache),
                 "validation_split_percentage": 0},
        "training": {"max_steps": steps, "learning_rate": learning_rate, "warmup_steps": 0, "seed": 7, "report_to": []},
    }
    plan = {"model": "tinyllama-1.1b", "strategy": strategy, "precision": "fp32", "micro_batch": micro,
            "gradient_accumulation_steps": accum, "seq_len": 32, "device": "cpu", "gpus_per_node": world,
            "activation_checkpointing": "selective" if "sac" in options else "ckpt" in options, "offload": "optimizer+params" if "offload" in options else "none",
            "loss_chunk_tokens": 24,  # several ragged chunks of the 2 x 32 tokens (ZeRO-3 keeps the full logits)
            "tp": 2 if "tp2" in options else 1}
    if option.startswith("amp-") or option == "fp8":
        plan["precision"] = option
    if option.startswith("mesh"):  # meshRxS: HSDP's (replicate, shard) mesh, as the plan's nodes x gpus_per_node
        plan["nodes"], plan["gpus_per_node"] = (int(n) for n in option[len("mesh"):].split("x"))
    (job / "config.yaml").write_text(yaml.safe_dump(config))
    (job / "plan.yaml").write_text(yaml.safe_dump(plan))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("runs", nargs="+", help="strategy:micro:accum[:ckpt|sac|amp-bf16|fp8|tied|offload|meshRxS|tp2[+...]]")
    args = parser.parse_args()
    _, rank, world = init_distributed()
    results, meshes, facts = {}, {}, {}
    for run in args.runs:
        strategy, micro, accum, option = (run.split(":") + [""])[:4]
        job = args.out / run.replace(":", "-")
        if rank == 0:
            write_job(job, args.data, args.out / "cache", strategy, int(micro), int(accum), args.steps, option, world,
                      args.learning_rate)
        dist.barrier()
        trainer = Trainer(job)
        if strategy in ("fsdp", "hsdp"):  # FSDP2's parameters are DTensors: their mesh and placements
            param = next(trainer.engine.wrapped.parameters())
            meshes[run] = {"shape": list(param.device_mesh.shape), "placements": [str(p) for p in param.placements]}
            policy = trainer.engine.wrapped._get_fsdp_state()._fsdp_param_group.offload_policy
            facts.setdefault(run, {})["offload_policy"] = type(policy).__name__
        # the chunked loss replaces the causal LM's forward on the instance (launcher/train/chunked_loss.py)
        facts.setdefault(run, {})["chunked_loss"] = "forward" in vars(trainer.engine.module)
        layer = trainer.engine.module.model.layers[0]
        checkpoint = getattr(layer, "_gradient_checkpointing_func", None) if layer.gradient_checkpointing else None
        context = getattr(checkpoint, "keywords", {}).get("context_fn")
        facts[run]["recompute_context"] = getattr(getattr(context, "func", context), "__name__", None)
        facts[run]["float8_linears"] = [name for name, m in trainer.engine.module.named_modules()
                                        if type(m).__name__ == "Float8Linear"]
        losses, facts[run]["grad_norms"] = [], []
        for _ in range(args.steps):
            loss = trainer.train_step()[0]  # [loss, router aux loss]
            dist.all_reduce(loss)
            losses.append(loss.item() / world)
            facts[run]["grad_norms"].append(float(trainer.last_grad_norm))
        facts[run]["tokens_seen"] = trainer.state.tokens_seen
        state = trainer.engine.full_state_dict()
        if rank == 0:
            # clone: a tied model's input and output embeddings are one tensor, which safetensors refuses to save twice
            save_file({k: v.float().contiguous().clone() for k, v in state.items()}, str(job / "weights.safetensors"))
        results[run] = losses
        del trainer, state
        gc.collect()
        dist.barrier()
    if rank == 0:
        (args.out / "losses.json").write_text(json.dumps(results))
        (args.out / "meshes.json").write_text(json.dumps(meshes))
        (args.out / "facts.json").write_text(json.dumps(facts))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
