"""Under torchrun: build a saved model the way each strategy's ranks do (engines.model_construction) and write
what each rank holds, and whether the ZeRO-3 build, gathered, is exactly the saved model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from launcher.config import ModelSection, TrainingSection
from launcher.planning.plan import Plan
from launcher.train.engines import model_construction
from launcher.train.distributed import init_distributed
from launcher.train.modeling import build_model, model_architecture, parameter_elements


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import deepspeed
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    _, rank, world = init_distributed()
    model = ModelSection(name_or_path=str(args.model))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    hidden_size = model_architecture(model, tokenizer).hidden_size
    report = {}
    for strategy in ("ddp", "fsdp", "zero3"):
        plan = Plan(model=str(args.model), strategy=strategy, device="cpu", precision="fp32", gpus_per_node=world)
        with model_construction(plan, TrainingSection(), {}, rank, hidden_size, quantized=False) as empty:
            net = build_model(model, plan, tokenizer, seed=0, empty=empty)
        held, total = parameter_elements(net)
        report[strategy] = {"held": held, "total": total}
        if strategy == "zero3":
            saved = load_file(args.model / "model.safetensors")
            with deepspeed.zero.GatheredParameters(list(net.parameters())):
                report[strategy]["equal_to_saved"] = all(torch.equal(p, saved[n]) for n, p in net.named_parameters())
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        args.out.write_text(json.dumps(reports))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
