"""FP8 training and context parallelism, measured: what `--precision fp8` and `--cp` should show on a GPU.

    PYTHONPATH=. python bench/fp8_cp.py [--smoke] --out bench/results/fp8-h200.json

fp8: `llaunch run` in amp-bf16 and then in fp8 (torchao float8 linears, launcher/train/float8.py) on the same
model, batch and blocks. It should show the fp8 losses within bf16's noise of amp-bf16's (a few per cent after
the warm-up), peak memory about amp-bf16's, tokens/s above it on fp8 tensor cores, each beside `llaunch plan`'s
prediction for this GPU (torchtitan measured 1.28x on 8 H100 for Llama 3.1 8B; a 1.1B gains less: its
attention and head are a larger share). --smoke: the same two runs, tiny, on the CPU (torch._scaled_mm has a
CPU kernel), against the plan of one H200.

cp: the ranks refuse --cp (launcher.planning.parallel.CP_REFUSAL): torch's ring attention has kernels only for
CUDA's SDPA. This step checks that premise where it runs: one forward and backward of a Llama through
`context_parallel` on a cp mesh of this one process (the CUDA kernel through the ring handler; the exchange
between ranks needs more GPUs than the lent machine has) against the same step without it. It should show equal
losses (bf16 noise) and the ring's time and peak memory beside plain SDPA's. On a CPU the ring fails as
CP_REFUSAL says, and the step is skipped with torch's error.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import Shapes, Skipped, device, sync, write_config, write_json

PRECISIONS = ("amp-bf16", "fp8")  # the reference first: a run stopped at its budget keeps it


def predicted(shapes: Shapes, precision: str, smoke: bool) -> dict:
    """`llaunch plan`'s figures for one rank of this run on this GPU (one H200 from the datasheet in --smoke)."""
    from launcher.planning.hardware import Hardware, probe
    from launcher.planning.planner import PlanRequest, make_plan

    hw = Hardware(gpu_name_override="H200", gpus_per_node_override=1, ram_bytes=128 * 2**30) if smoke else probe()
    overrides = {**shapes.overrides, "vocab_size": shapes.vocab_size}
    plan = make_plan(PlanRequest(model=shapes.model, model_overrides=overrides, seq_len=shapes.seq,
                                 micro_batch=shapes.micro, gradient_accumulation_steps=1, precision=precision,
                                 strategy="ddp", gpus_per_node=1), hw)
    return {"predicted_tokens_per_s": plan.predicted["tokens_per_s"],
            "predicted_peak_gib": plan.memory["peak_bytes"] / 2**30, "plan_gpu": plan.gpu_name}


def measure_fp8(shapes: Shapes, work: Path, smoke: bool, save=lambda result: None) -> dict:
    import throughput

    result: dict = {"rows": {}}
    for precision in PRECISIONS:
        config = write_config(work / f"{precision}.yaml", work / "cache", shapes)
        measured = throughput.run_llaunch(config, work / precision, shapes, precision=precision)
        result["rows"][precision] = {**measured, **predicted(shapes, precision, smoke)}
        save(result)
    bf16, fp8 = (dict(result["rows"][p]["losses"]) for p in PRECISIONS)
    after = [step for step in fp8 if step > shapes.warmup_steps and step in bf16]
    result["max_rel_loss_diff"] = max(abs(fp8[s] - bf16[s]) / abs(bf16[s]) for s in after)
    result["speedup"] = result["rows"]["fp8"]["tokens_per_s"] / result["rows"]["amp-bf16"]["tokens_per_s"]
    result["predicted_speedup"] = (result["rows"]["fp8"]["predicted_tokens_per_s"]
                                   / result["rows"]["amp-bf16"]["predicted_tokens_per_s"])
    save(result)
    return result


def measure_cp(shapes: Shapes, work: Path) -> dict:
    """One training step's loss, time and peak memory with and without torch's ring attention on a cp mesh of
    this one process (what one GPU allows: the ring handler and its CUDA kernel, not the exchange)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.planning.models import load_model_spec

    here = device()
    dist.init_process_group("nccl" if here.type == "cuda" else "gloo", init_method=f"file://{work / 'cp-store'}",
                            rank=0, world_size=1)
    mesh = init_device_mesh(here.type, (1,), mesh_dim_names=("cp",))
    spec = load_model_spec(shapes.model, {**shapes.overrides, "vocab_size": shapes.vocab_size})
    torch.manual_seed(0)
    dtype = torch.bfloat16 if here.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec.hf_config), dtype=dtype,
                                             attn_implementation="sdpa").to(here)
    ids = torch.randint(0, shapes.vocab_size, (shapes.micro, shapes.seq), device=here)
    # shifted before the split, as torchtitan does: a rank's last label is the next rank's first token
    shifted = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    rows = {}
    for name in ("sdpa", "ring"):
        batch = [ids.clone(), torch.arange(shapes.seq, device=here).expand_as(ids).clone(), shifted.clone()]
        model.zero_grad(set_to_none=True)
        if here.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        try:
            with context_parallel(mesh, buffers=batch, buffer_seq_dims=[1, 1, 1], no_restore_buffers=set(batch)) \
                    if name == "ring" else torch.enable_grad(), torch.enable_grad():
                loss = model(input_ids=batch[0], position_ids=batch[1], labels=batch[2], shift_labels=batch[2]).loss
                loss.backward()
        except (NotImplementedError, RuntimeError) as error:
            raise Skipped(f"torch's ring attention on {here.type}: {str(error).strip().splitlines()[0]}") from error
        sync()
        rows[name] = {"loss": loss.item(), "step_s": time.perf_counter() - start,
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if here.type == "cuda" else None}
    return {"cp": mesh.size(), "rows": rows, "rel_loss_diff": abs(rows["ring"]["loss"] - rows["sdpa"]["loss"])
            / abs(rows["sdpa"]["loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/llaunch-bench"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/fp8-h200.json"))
    args = parser.parse_args()
    shapes = Shapes.smoke() if args.smoke else Shapes(steps=30)
    print(measure_fp8(shapes, args.work, args.smoke, save=lambda r: write_json(args.out, r)))


if __name__ == "__main__":
    main()
