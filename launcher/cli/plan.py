"""`llaunch plan`: choose strategy, micro-batch, checkpointing and offload for a model on some GPUs, and say why."""

from __future__ import annotations

import argparse
import json

from launcher.errors import LaunchError
from launcher.plan import ATTENTIONS, METHODS, OFFLOADS, OPTIMIZERS, PRECISIONS, STRATEGIES

TABLE_ROWS = 14


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="pick the fastest parallel plan that fits, with a memory breakdown")
    p.add_argument("--model", required=True, help="alias (7b, 70b), catalog name, cached HF id, model dir or config.json")
    p.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE",
                   help="change an HF config key before counting (e.g. num_hidden_layers=4); repeatable")
    hw = p.add_argument_group("hardware (default: this machine's probe)")
    hw.add_argument("--gpus", type=int, help="GPUs per node")
    hw.add_argument("--nodes", type=int, help="number of nodes")
    hw.add_argument("--gpu", help="GPU model for peak FLOP/s and bandwidth (H100, A100-40GB, L40S, ...)")
    hw.add_argument("--gpu-mem", help="memory per GPU, e.g. 80GiB or 40GB")
    knobs = p.add_argument_group("knobs (default: the planner chooses)")
    knobs.add_argument("--strategy", choices=STRATEGIES)
    knobs.add_argument("--offload", choices=OFFLOADS)
    knobs.add_argument("--micro-batch", type=int)
    knobs.add_argument("--global-batch", help="sequences per optimizer step, or tokens with a 'tok' suffix (524288tok)")
    knobs.add_argument("--seq-len", type=int, default=2048)
    knobs.add_argument("--precision", choices=PRECISIONS)
    knobs.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    knobs.add_argument("--method", choices=METHODS, default="full")
    knobs.add_argument("--lora-r", type=int, default=16)
    knobs.add_argument("--lora-targets", default="all-linear", help="all-linear or a comma list (q_proj,v_proj)")
    knobs.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    knobs.add_argument("--attention", choices=ATTENTIONS, default="sdpa")
    p.add_argument("--trace", action="store_true",
                   help="also trace one real step of the model cut to 1-2 layers on fake tensors (MemTracker), scaled by depth")
    p.add_argument("--json", action="store_true", help="print the chosen plan as JSON")
    p.add_argument("-o", "--output", help="write the Plan YAML that `llaunch run` and `submit` read")
    p.set_defaults(run=run)


def request_from_args(args):
    """Flags -> PlanRequest, with each malformed value named in one sentence."""
    from launcher.planner import PlanRequest
    from launcher.units import parse_bytes

    overrides = {}
    for item in args.model_override:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LaunchError(f"--model-override {item!r} must look like KEY=VALUE (e.g. num_hidden_layers=4).")
        overrides[key.strip()] = _json_value(value)
    global_batch = global_tokens = None
    if args.global_batch is not None:
        text = str(args.global_batch).strip().lower()
        number = text.removesuffix("tokens").removesuffix("tok")
        if not number.isdigit() or int(number) < 1:
            raise LaunchError(f"--global-batch {args.global_batch!r} must be a positive count of sequences, or of tokens like 524288tok.")
        if number != text:
            global_tokens = int(number)
        else:
            global_batch = int(number)
    return PlanRequest(
        model=args.model, model_overrides=overrides, nodes=args.nodes, gpus_per_node=args.gpus, gpu=args.gpu,
        gpu_mem_bytes=parse_bytes(args.gpu_mem, "--gpu-mem") if args.gpu_mem is not None else None,
        strategy=args.strategy, offload=args.offload, micro_batch=args.micro_batch, global_batch=global_batch,
        global_batch_tokens=global_tokens, seq_len=args.seq_len, precision=args.precision,
        activation_checkpointing=args.activation_checkpointing, method=args.method, lora_r=args.lora_r,
        lora_targets=[t.strip() for t in args.lora_targets.split(",") if t.strip()], optimizer=args.optimizer,
        attention=args.attention,
    ).validate()


def _json_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def run(args) -> int:
    from launcher.hardware import probe
    from launcher.models import load_model_spec
    from launcher.planner import hardware_for, make_plan, rank_candidates

    request = request_from_args(args)
    probed = probe()
    plan = make_plan(request, probed)
    if args.trace:
        add_trace(plan, request)
    if args.output:
        plan.save(args.output)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    spec = load_model_spec(request.model, request.model_overrides)
    hw = hardware_for(request, probed)
    print_table(spec, plan, rank_candidates(spec, request, hw))
    if args.output:
        print(f"wrote {args.output}")
    return 0


def add_trace(plan, request) -> None:
    """Put the traced peak beside the estimate for the same knobs on one unsharded rank (what a trace can run)."""
    from launcher.memory import TrainSetup, estimate
    from launcher.memory_trace import trace_peak
    from launcher.models import load_model_spec
    from launcher.units import format_bytes

    spec = load_model_spec(request.model, request.model_overrides)
    setup = TrainSetup(precision=plan.precision, method=plan.method, optimizer=plan.optimizer, attention=plan.attention,
                       activation_checkpointing=plan.activation_checkpointing, micro_batch=plan.micro_batch,
                       seq_len=plan.seq_len, lora_r=plan.lora_r, lora_targets=list(plan.lora_targets), device=plan.device)
    traced = trace_peak(spec, setup).peak_bytes
    estimated = estimate(spec, setup).peak_bytes
    plan.memory["trace_peak_bytes"] = traced
    plan.memory["trace_estimate_bytes"] = estimated
    plan.reasons.append(f"trace (MemTracker, fake tensors, 1 rank unsharded): peak {format_bytes(traced)} vs "
                        f"estimate {format_bytes(estimated)} ({(estimated - traced) / traced:+.1%}).")


def print_table(spec, plan, candidates) -> None:
    from rich.console import Console
    from rich.table import Table

    from launcher.units import format_bytes

    gib = lambda n: f"{n / 2**30:.1f}"  # noqa: E731 - one-line column formatter
    where = "CPU" if plan.device == "cpu" else f"{plan.nodes}x{plan.gpus_per_node} {plan.gpu_name}"
    table = Table(title=f"{spec.name}: {spec.num_params / 1e9:.3g}B params on {where} (GiB per rank)")
    for column in ("strategy", "mb", "ga", "ckpt", "weights", "grads", "optim", "activ", "logits",
                   "comm", "ctx+rsv", "peak", "reserved/limit", "fits", "step s", "tok/s", "MFU"):
        table.add_column(column, justify="left" if column == "strategy" else "right", no_wrap=True)
    smallest_misses = {}  # per strategy, the candidate that came closest to fitting
    for c in candidates:
        best = smallest_misses.get(c.setup.strategy)
        if not c.fits and (best is None or c.memory.reserved_bytes < best.memory.reserved_bytes):
            smallest_misses[c.setup.strategy] = c
    shown = [c for c in candidates if c.fits][:TABLE_ROWS - 5] + list(smallest_misses.values())
    for c in shown:
        s, m = c.setup, c.memory
        chosen = (s.strategy, s.offload, s.micro_batch, s.activation_checkpointing, s.gradient_accumulation_steps) == (
            plan.strategy, plan.offload, plan.micro_batch, plan.activation_checkpointing, plan.gradient_accumulation_steps)
        weights = m["weights"] + (m["frozen_weights"] if any(t.name == "frozen_weights" for t in m.terms) else 0)
        table.add_row(
            s.strategy + ("" if s.offload == "none" else f"+off:{s.offload}"), str(s.micro_batch), str(s.gradient_accumulation_steps),
            "on" if s.activation_checkpointing else "off", gib(weights), gib(m["grads"]),
            gib(m["optimizer"] + m["optimizer_scratch"]), gib(m["activations"]), gib(m["logits_loss"]),
            gib(m["comm_buffers"]), gib(m["context_reserve"]), gib(m.peak_bytes),
            f"{gib(m.reserved_bytes)}/{gib(c.limit_bytes)}", "yes" if c.fits else "no",
            f"{c.step_time_s:.3g}", f"{c.tokens_per_s:,.0f}", f"{c.mfu:.0%}",
            style="bold green" if chosen else ("dim" if not c.fits else None),
        )
    console = Console(width=max(Console().width, 170))  # the table is wide; never squeeze it into 80 columns
    console.print(table)
    console.print(f"[bold]chosen:[/bold] {plan.strategy}"
                  + (f" + offload {plan.offload}" if plan.offload != "none" else "")
                  + f", micro-batch {plan.micro_batch} x accumulation {plan.gradient_accumulation_steps}, "
                  f"checkpointing {'on' if plan.activation_checkpointing else 'off'}, {plan.precision}, {plan.method}; "
                  f"peak {format_bytes(plan.memory['peak_bytes'])}")
    for reason in plan.reasons:
        console.print(f"  why: {reason}")
