"""Measured vs predicted peak GPU memory of one training step (the estimator's ground truth).

Each config runs in a fresh subprocess: random-init Llama on the GPU, sdpa attention, HF non-reentrant
activation checkpointing when on, PEFT LoRA (r=16, all-linear) when asked, torch AdamW (foreach), 4 steps of
`loss = model(input_ids=x, labels=x).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)`,
amp-* under torch.autocast with fp32 weights, bf16 with the model cast to bf16 (as launcher/train/modeling.py does).
It prints torch.cuda.max_memory_allocated beside launcher.planning.memory's peak_bytes, and per-phase peaks.

    PYTHONPATH=. python bench/memory_truth.py --out bench/results/memory-h100.json
    PYTHONPATH=. python bench/memory_truth.py --matrix gpu-check --out bench/results/memory-h200.json
    PYTHONPATH=. python bench/memory_truth.py --smoke --out /tmp/memory-smoke.json   # tiny, CPU, fp32

A config is (size, precision, method, micro_batch, checkpointing[, optimizer]); qlora loads the base in 4-bit
through launcher's own quantization_config and apply_finetune_method (which always checkpoints), adamw_bnb_8bit is
bitsandbytes' AdamW8bit. A row that cannot run here (no GPU for QLoRA, no bitsandbytes) is kept with its reason.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import NO_CUDA_PEAK, TINY_LLAMA, Skipped, device, random_pretrained, write_json

SIZES = {
    # ~150M, ~400M and ~1.1B Llama-architecture models (vocab 32000, random init).
    "llama-150m": ("tinyllama-1.1b", {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
                                      "num_attention_heads": 12, "num_key_value_heads": 12}),
    "llama-400m": ("tinyllama-1.1b", {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24,
                                      "num_attention_heads": 16, "num_key_value_heads": 8}),
    "llama-1.1b": ("tinyllama-1.1b", {}),
    "tiny": ("tinyllama-1.1b", TINY_LLAMA),
}
# (size, precision, method, micro_batch, activation_checkpointing); seq 2048 throughout.
MATRIX = [
    ("llama-150m", "amp-bf16", "full", 1, False), ("llama-150m", "amp-bf16", "full", 4, False),
    ("llama-150m", "amp-bf16", "full", 8, True), ("llama-150m", "bf16", "full", 4, False),
    ("llama-150m", "bf16", "full", 8, True), ("llama-150m", "amp-bf16", "lora", 4, False),
    ("llama-150m", "bf16", "lora", 8, False),
    ("llama-400m", "amp-bf16", "full", 2, False), ("llama-400m", "amp-bf16", "full", 4, True),
    ("llama-400m", "bf16", "full", 4, False), ("llama-400m", "bf16", "full", 8, True),
    ("llama-400m", "amp-bf16", "lora", 2, False), ("llama-400m", "bf16", "lora", 4, True),
    ("llama-1.1b", "amp-bf16", "full", 1, False), ("llama-1.1b", "amp-bf16", "full", 2, False),
    ("llama-1.1b", "amp-bf16", "full", 4, False), ("llama-1.1b", "amp-bf16", "full", 8, False),
    ("llama-1.1b", "amp-bf16", "full", 1, True), ("llama-1.1b", "amp-bf16", "full", 4, True),
    ("llama-1.1b", "amp-bf16", "full", 8, True), ("llama-1.1b", "bf16", "full", 4, False),
    ("llama-1.1b", "bf16", "lora", 4, False), ("llama-1.1b", "amp-bf16", "lora", 2, True),
]
# Held out of calibration: run after the estimator was fitted to MATRIX, to confirm it.
CONFIRM = [
    ("llama-150m", "amp-bf16", "full", 8, False), ("llama-400m", "amp-bf16", "full", 8, False),
    ("llama-400m", "bf16", "lora", 8, False), ("llama-1.1b", "bf16", "full", 8, True),
    ("llama-1.1b", "amp-bf16", "lora", 4, False),
]
# The one-call GPU check (bench/gpu_check.sh): the 1.1B at mb 1-8 with and without checkpointing, bf16, LoRA,
# QLoRA and the 8-bit optimizer; most informative first, since the step's time budget may stop it early.
GPU_CHECK = [
    ("llama-1.1b", "amp-bf16", "full", 4, False), ("llama-1.1b", "amp-bf16", "full", 4, True),
    ("llama-1.1b", "bf16", "full", 4, False), ("llama-1.1b", "bf16", "lora", 4, False),
    ("llama-1.1b", "bf16", "qlora", 4, True), ("llama-1.1b", "amp-bf16", "full", 4, False, "adamw_bnb_8bit"),
    ("llama-1.1b", "amp-bf16", "full", 1, False), ("llama-1.1b", "amp-bf16", "full", 8, True),
    ("llama-1.1b", "amp-bf16", "full", 2, False), ("llama-1.1b", "amp-bf16", "full", 8, False),
    ("llama-1.1b", "amp-bf16", "full", 1, True), ("llama-1.1b", "amp-bf16", "full", 2, True),
    ("llama-1.1b", "bf16", "full", 8, True), ("llama-1.1b", "amp-bf16", "lora", 4, True),
    ("llama-1.1b", "bf16", "qlora", 8, True),
]
# --smoke: every kind of row once, tiny and in fp32 (bf16 needs a GPU to mean anything).
SMOKE = [
    ("tiny", "fp32", "full", 2, False), ("tiny", "fp32", "full", 2, True), ("tiny", "fp32", "lora", 2, False),
    ("tiny", "fp32", "qlora", 2, True), ("tiny", "fp32", "full", 2, False, "adamw_bnb_8bit"),
]
MATRICES = {"calibration": MATRIX, "confirm": CONFIRM, "gpu-check": GPU_CHECK, "smoke": SMOKE}
SEQ = 2048
SMOKE_SEQ = 64
STEPS = 4
SMOKE_STEPS = 2  # one warm-up, one timed: the smoke checks that a row runs, not how fast
CONFIG_KEYS = ("size", "precision", "method", "micro_batch", "checkpointing", "optimizer")


def predict(size: str, precision: str, method: str, micro: int, ckpt: bool, optimizer: str = "adamw_torch",
            seq: int = SEQ) -> dict:
    from launcher.planning.memory import estimate
    from launcher.planning.plan import TrainSetup
    from launcher.planning.models import load_model_spec

    base, overrides = SIZES[size]
    spec = load_model_spec(base, overrides)
    setup = TrainSetup(strategy="ddp", precision=precision, method=method, micro_batch=micro, seq_len=seq,
                       activation_checkpointing=ckpt, optimizer=optimizer)
    breakdown = estimate(spec, setup)
    return {"params": spec.num_params, "peak_bytes": breakdown.peak_bytes, "phase": breakdown.peak_phase,
            "phases": breakdown.phases, "terms": breakdown.to_dict()}


def build(size: str, precision: str, method: str, ckpt: bool, work: Path):
    """The model as launcher.train builds it for this row, on this process's device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.config import FinetuneSection
    from launcher.planning.models import load_model_spec
    from launcher.train.adapters import apply_finetune_method, quantization_config
    from launcher.planning.plan import recompute_mode
    from launcher.train.recompute import enable_recompute

    base, overrides = SIZES[size]
    finetune = FinetuneSection(method=method, r=16, lora_alpha=32, lora_dropout=0.0)
    if method == "qlora":
        try:
            quantization = quantization_config(finetune)
        except Exception as err:  # LaunchError: no GPU, or no bitsandbytes
            raise Skipped(str(err)) from None
        source = random_pretrained(base, overrides, work / f"random-{size}")
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16, quantization_config=quantization,
                                                     device_map={"": torch.cuda.current_device()
                                                                 if torch.cuda.is_available() else "cpu"},
                                                     attn_implementation="sdpa")
    else:
        config = AutoConfig.for_model(**load_model_spec(base, overrides).hf_config)
        torch.manual_seed(0)
        with device():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
        enable_recompute(model, recompute_mode(ckpt))
        if precision == "bf16":
            model.to(torch.bfloat16)
        if method == "lora" and recompute_mode(ckpt) != "none":
            model.enable_input_require_grads()
    model.config.use_cache = False
    return apply_finetune_method(model, finetune)


def optimizer_for(name: str, model):
    """The optimizer a run with training.optim NAME builds (launcher's own builder), so the measured step and the
    estimate name the same thing; 8-bit AdamW without bitsandbytes is skipped, not faked."""
    from launcher.config import TrainingSection
    from launcher.errors import LaunchError
    from launcher.train.optim import build_optimizer

    try:
        return build_optimizer(model, name, TrainingSection(optim=name, learning_rate=1e-4, weight_decay=0.0))
    except LaunchError as err:
        raise Skipped(str(err)) from None


def measure(size: str, precision: str, method: str, micro: int, ckpt: bool, optimizer: str = "adamw_torch",
            seq: int = SEQ, steps: int = STEPS, work: Path = Path("/tmp/llaunch-bench")) -> dict:
    """Peak allocated memory per phase and the median step time of `steps` steps (the first is warm-up)."""
    import torch

    cuda = device().type == "cuda"
    model = build(size, precision, method, ckpt, work)
    model.train()
    opt = optimizer_for(optimizer, model)
    vocab = model.get_input_embeddings().num_embeddings
    x = torch.randint(0, vocab, (micro, seq), device=device())
    autocast = torch.autocast(device().type, dtype=torch.bfloat16, enabled=precision.startswith("amp"))

    def peak() -> int:
        value = torch.cuda.max_memory_allocated() if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        return value

    phases, times = {}, []
    for step in range(steps):
        start = time.perf_counter()
        peak()
        with autocast:
            loss = model(input_ids=x, labels=x).loss
        fwd = peak()
        loss.backward()
        bwd = peak()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stp = peak()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if step >= 1:  # steady state: optimizer states exist
            for name, value in (("forward", fwd), ("backward", bwd), ("optimizer_step", stp)):
                phases[name] = max(phases.get(name, 0), value)
    result = {"step_s": statistics.median(times[1:]), "loss": loss.item()}
    if not cuda:
        return {**result, "max_allocated": None, "peak_skipped": NO_CUDA_PEAK}
    return {**result, "max_allocated": max(phases.values()), "phases": phases,
            "max_reserved": torch.cuda.max_memory_reserved()}


def measure_in_subprocess(config: tuple, seq: int, steps: int, work: Path, timeout: float) -> dict:
    """One config in a fresh process: peak statistics and the allocator start clean."""
    command = [sys.executable, __file__, "--one", json.dumps(config), "--seq", str(seq), "--steps", str(steps),
               "--work", str(work)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    if done.returncode != 0:
        return {"error": done.stderr[-400:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_row(config: tuple, seq: int, steps: int, work: Path, timeout: float = 120) -> dict:
    """On a GPU in a fresh process (peak statistics and the allocator start clean); on a CPU, with no peak to
    isolate, in this one (a Python start costs more than a tiny row)."""
    import torch

    if torch.cuda.is_available():
        return measure_in_subprocess(config, seq, steps, work, timeout)
    try:
        return measure(*config, seq=seq, steps=steps, work=work)
    except Skipped as why:
        return {"skipped": str(why)}


def run_rows(configs: list[tuple], *, seq: int = SEQ, steps: int = STEPS, work: Path = Path("/tmp/llaunch-bench"),
             timeout: float = 120, save=lambda rows: None) -> list[dict]:
    """Measure and predict each config; `save(rows)` after every row, so a stopped run keeps its rows."""
    rows = []
    for config in configs:
        measured = measure_row(config, seq, steps, work, timeout)
        row = {"config": dict(zip(CONFIG_KEYS, (*config, "adamw_torch")[:len(CONFIG_KEYS)])), "seq_len": seq,
               "measured": measured, "predicted": predict(*config, seq=seq)}
        rows.append(row)
        print(format_row(row), flush=True)
        save(rows)
    return rows


def format_row(row: dict) -> str:
    from launcher.planning.plan import recompute_mode

    c, m, p = row["config"], row["measured"], row["predicted"]
    head = (f"{c['size']:<11} {c['precision']:<8} {c['method']:<5} mb={c['micro_batch']} "
            f"ckpt={recompute_mode(c['checkpointing']):<9} {c.get('optimizer', 'adamw_torch'):<14}")
    if "error" in m:
        return f"{head}  ERROR {m['error'][-200:]!r}"
    if "skipped" in m:
        return f"{head}  skipped: {m['skipped']}"
    if m["max_allocated"] is None:
        return f"{head}  predicted {p['peak_bytes'] / 2**30:6.2f} GiB  step {m['step_s'] * 1000:7.1f} ms  (no CUDA peak)"
    err = (p["peak_bytes"] - m["max_allocated"]) / m["max_allocated"]
    return (f"{head}  measured {m['max_allocated'] / 2**30:6.2f} GiB  predicted {p['peak_bytes'] / 2**30:6.2f} GiB  "
            f"error {err:+6.1%}  step {m['step_s'] * 1000:7.1f} ms  phase meas/pred "
            f"{max(m['phases'], key=m['phases'].get)}/{p['phase']}")


def summary(rows: list[dict]) -> str:
    errors = [(r["predicted"]["peak_bytes"] - r["measured"]["max_allocated"]) / r["measured"]["max_allocated"]
              for r in rows if r["measured"].get("max_allocated")]
    if not errors:
        return f"{len(rows)} configs, no measured CUDA peak"
    return (f"{len(errors)} configs: median |error| {statistics.median(abs(e) for e in errors):.1%}, "
            f"worst under-prediction {min(errors):+.1%}, worst over-prediction {max(errors):+.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help="internal: measure one config (JSON list) in this process")
    parser.add_argument("--seq", type=int, default=SEQ, help="with --one: sequence length")
    parser.add_argument("--steps", type=int, default=STEPS, help="with --one: steps, the first one warm-up")
    parser.add_argument("--out", type=Path, help="write rows as JSON here")
    parser.add_argument("--timeout", type=int, default=120)
    parser.add_argument("--matrix", choices=tuple(MATRICES), default="calibration")
    parser.add_argument("--smoke", action="store_true", help="the smoke matrix: tiny model, seq 64, CPU/fp32")
    parser.add_argument("--work", type=Path, default=Path("/tmp/llaunch-bench"), help="random-init models for QLoRA")
    parser.add_argument("--replay", help="re-predict a saved JSON (after changing the estimator) without a GPU")
    args = parser.parse_args()
    if args.one:
        try:
            print(json.dumps(measure(*json.loads(args.one), seq=args.seq, steps=args.steps, work=args.work)))
        except Skipped as why:
            print(json.dumps({"skipped": str(why)}))
        return
    if args.replay:
        rows = json.load(open(args.replay))
        for row in rows:
            row["predicted"] = predict(*row["config"].values(), seq=row.get("seq_len", SEQ))
            print(format_row(row))
    else:
        matrix = "smoke" if args.smoke else args.matrix
        rows = run_rows(MATRICES[matrix], seq=SMOKE_SEQ if args.smoke else SEQ,
                        steps=SMOKE_STEPS if args.smoke else STEPS, work=args.work, timeout=args.timeout,
                        save=lambda rows: args.out and write_json(args.out, rows))
    print(summary(rows))
    if args.out:
        write_json(args.out, rows)


if __name__ == "__main__":
    main()
