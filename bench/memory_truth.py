"""Measured vs predicted peak GPU memory of one training step (the estimator's ground truth).

Each config runs in a fresh subprocess: random-init Llama on the GPU, sdpa attention, HF non-reentrant
activation checkpointing when on, PEFT LoRA (r=16, all-linear) when asked, torch AdamW (foreach), 4 steps of
`loss = model(input_ids=x, labels=x).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)`,
amp-* under torch.autocast with fp32 weights, bf16 with the model cast to bf16 (as launcher/train/modeling.py does).
It prints torch.cuda.max_memory_allocated beside launcher.memory's peak_bytes, and per-phase peaks.

    PYTHONPATH=. python bench/memory_truth.py --out bench/results/memory-h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

SIZES = {
    # ~150M, ~400M and ~1.1B Llama-architecture models (vocab 32000, random init).
    "llama-150m": ("tinyllama-1.1b", {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
                                      "num_attention_heads": 12, "num_key_value_heads": 12}),
    "llama-400m": ("tinyllama-1.1b", {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24,
                                      "num_attention_heads": 16, "num_key_value_heads": 8}),
    "llama-1.1b": ("tinyllama-1.1b", {}),
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
SEQ = 2048
STEPS = 4


def predict(size: str, precision: str, method: str, micro: int, ckpt: bool) -> dict:
    from launcher.memory import TrainSetup, estimate
    from launcher.models import load_model_spec
    from launcher.train.modeling import enable_activation_checkpointing

    base, overrides = SIZES[size]
    spec = load_model_spec(base, overrides)
    setup = TrainSetup(strategy="ddp", precision=precision, method=method, micro_batch=micro, seq_len=SEQ,
                       activation_checkpointing=ckpt, world_size=1)
    breakdown = estimate(spec, setup)
    return {"params": spec.num_params, "peak_bytes": breakdown.peak_bytes, "phase": breakdown.peak_phase,
            "phases": breakdown.phases, "terms": breakdown.to_dict()}


def measure(size: str, precision: str, method: str, micro: int, ckpt: bool) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.models import load_model_spec

    base, overrides = SIZES[size]
    config = AutoConfig.for_model(**load_model_spec(base, overrides).hf_config)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    if ckpt:
        enable_activation_checkpointing(model)
    if precision == "bf16":
        model.to(torch.bfloat16)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        if ckpt:
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    x = torch.randint(0, config.vocab_size, (micro, SEQ), device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision.startswith("amp"))
    phases, times = {}, []
    for step in range(STEPS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        torch.cuda.reset_peak_memory_stats()
        with autocast:
            loss = model(input_ids=x, labels=x).loss
        fwd = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        bwd = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stp = torch.cuda.max_memory_allocated()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if step >= 1:  # steady state: optimizer states exist
            for name, value in (("forward", fwd), ("backward", bwd), ("optimizer_step", stp)):
                phases[name] = max(phases.get(name, 0), value)
    return {"max_allocated": max(phases.values()), "phases": phases,
            "max_reserved": torch.cuda.max_memory_reserved(), "step_s": statistics.median(times[1:]),
            "loss": float(loss)}


def run_matrix(args) -> list[dict]:
    rows = []
    for config in {"calibration": MATRIX, "confirm": CONFIRM}[args.matrix]:
        label = json.dumps(config)
        try:
            done = subprocess.run([sys.executable, __file__, "--one", label], capture_output=True, text=True,
                                  timeout=args.timeout)
            measured = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {"error": done.stderr[-400:]}
        except subprocess.TimeoutExpired:
            measured = {"error": "timeout"}
        row = {"config": dict(zip(("size", "precision", "method", "micro_batch", "checkpointing"), config)),
               "measured": measured, "predicted": predict(*config)}
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    c, m, p = row["config"], row["measured"], row["predicted"]
    head = f"{c['size']:<11} {c['precision']:<8} {c['method']:<4} mb={c['micro_batch']} ckpt={'on ' if c['checkpointing'] else 'off'}"
    if "error" in m:
        return f"{head}  ERROR {m['error'][-200:]!r}"
    err = (p["peak_bytes"] - m["max_allocated"]) / m["max_allocated"]
    return (f"{head}  measured {m['max_allocated'] / 2**30:6.2f} GiB  predicted {p['peak_bytes'] / 2**30:6.2f} GiB  "
            f"error {err:+6.1%}  step {m['step_s'] * 1000:7.1f} ms  phase meas/pred "
            f"{max(m['phases'], key=m['phases'].get)}/{p['phase']}")


def summary(rows: list[dict]) -> str:
    errors = [(r["predicted"]["peak_bytes"] - r["measured"]["max_allocated"]) / r["measured"]["max_allocated"]
              for r in rows if "error" not in r["measured"]]
    if not errors:
        return "no successful measurements"
    return (f"{len(errors)} configs: median |error| {statistics.median(abs(e) for e in errors):.1%}, "
            f"worst under-prediction {min(errors):+.1%}, worst over-prediction {max(errors):+.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help="internal: measure one config (JSON list) in this process")
    parser.add_argument("--out", help="write rows as JSON here")
    parser.add_argument("--timeout", type=int, default=120)
    parser.add_argument("--matrix", choices=("calibration", "confirm"), default="calibration")
    parser.add_argument("--replay", help="re-predict a saved JSON (after changing the estimator) without a GPU")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*json.loads(args.one))))
        return
    if args.replay:
        rows = json.load(open(args.replay))
        for row in rows:
            row["predicted"] = predict(*row["config"].values())
            print(format_row(row))
    else:
        rows = run_matrix(args)
    print(summary(rows))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
