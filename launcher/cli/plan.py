"""`llaunch plan`: choose strategy, micro-batch, checkpointing and offload for a model on some GPUs, and say why."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from launcher.errors import LaunchError
from launcher.files import check_file_target
from launcher.knobs import PLAN, add_knob_flags, cli_knobs

TABLE_ROWS = 14
HARDWARE = ("hardware (default: this machine's GPUs; without any, these flags, --cluster, the SLURM partition seen "
            "from a login node, else what the model takes on common GPUs)")
GPUS_PER_NODE = 8  # what --nodes K without --gpus-per-node means when no GPUs are visible: nodes of eight


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="pick the fastest parallel plan that fits, with a memory breakdown")
    p.add_argument("--model", required=True, help="alias (7b, 70b), catalog name, cached HF id, model dir or config.json")
    p.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE",
                   help="change an HF config key before counting (e.g. num_hidden_layers=4); repeatable")
    groups = add_knob_flags(p, PLAN, {"hardware": HARDWARE})
    groups["hardware"].add_argument("--cluster", help="plan for a cluster profile's nodes (as `submit --cluster` does): "
                                    "a name under cluster/profiles or a YAML path")
    groups["hardware"].add_argument("--partition", help="on a SLURM login node: plan for this partition's GPUs "
                                    "(default: the default partition)")
    p.add_argument("--trace", action="store_true",
                   help="also trace one real step of the model cut to 1-2 layers on fake tensors (MemTracker), scaled by depth")
    p.add_argument("--json", action="store_true", help="print the chosen plan as JSON")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also draw the candidates' per-GPU memory by component against the limit (or, with no GPUs "
                        "described, memory per GPU against GPU count per strategy)")
    p.add_argument("-o", "--output", help="write the Plan YAML that `llaunch run` and `submit` read")
    p.set_defaults(run=run)


def request_from_args(args):
    """Flags -> PlanRequest, with each malformed value named in one sentence."""
    from launcher.planning.planner import PlanRequest

    overrides = {}
    for item in args.model_override:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LaunchError(f"--model-override {item!r} must look like KEY=VALUE (e.g. num_hidden_layers=4).")
        overrides[key.strip()] = _json_value(value)
    return PlanRequest(model=args.model, model_overrides=overrides, **cli_knobs(args)).validate()


def _json_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def run(args) -> int:
    from launcher.planning.hardware import probe
    from launcher.planning.models import load_model_spec
    from launcher.planning.planner import hardware_for, make_plan, rank_candidates

    request = request_from_args(args)
    if args.output:  # before the planning, not after it
        check_file_target(Path(args.output), "-o")
        if Path(args.output).is_file():
            from launcher.planning.plan import Plan

            try:
                Plan.load(args.output)
            except LaunchError:
                raise LaunchError(f"-o {args.output} exists and is not a plan; llaunch replaces only an earlier "
                                  f"plan, so choose another file.") from None
    if args.plot:
        _check_plot_path(args.plot)
    target = planning_target(args, request, probe())
    if target is None:
        return what_it_takes(args, request)
    hardware, source = target
    plan = make_plan(request, hardware)
    trace = add_trace(plan, request) if args.trace else None
    spec = load_model_spec(request.model, request.model_overrides)
    candidates = rank_candidates(spec, request, hardware_for(request, hardware))
    if args.plot:
        from launcher.planning.plan_plot import plot_candidates

        shown = shown_candidates(candidates)
        chosen = next(c.label for c in candidates if is_chosen(c, plan))
        plot_candidates(args.plot, f"{spec.name} on {_where(plan)}: memory per GPU by candidate", shown, chosen)
    if args.output:
        plan.save(args.output)
    if args.json:
        print(json.dumps({**plan.to_dict(), **({"trace": trace} if trace else {})}, indent=2))  # parallel: the layout
        return 0
    print(f"hardware from {source}")
    print_table(spec, plan, candidates)
    for path in (args.output, args.plot):
        if path:
            print(f"wrote {path}")
    return 0


def _check_plot_path(path: str) -> None:
    target = Path(path)
    check_file_target(target, "--plot")
    if target.suffix.lower() != ".png":
        raise LaunchError(f"--plot {path!r} must name a .png file, e.g. --plot plan.png.")
    if not target.parent.is_dir():
        raise LaunchError(f"--plot {path!r}: folder {target.parent} does not exist; create it or choose another path.")


def _where(plan) -> str:
    return "CPU" if plan.device == "cpu" else f"{plan.nodes}x{plan.gpus_per_node} {plan.gpu_name}"


def planning_target(args, request, probed):
    """(the machine to plan for, where it was described), or None when nothing describes GPUs.

    --device cpu plans this machine's CPU. Otherwise a --cluster profile, else the GPUs here, else the login
    node's SLURM partition, else the hardware flags describe the nodes (flags override each field of the first
    two). A CPU plan without --device cpu would answer a question nobody asked: what 70B takes on a laptop.
    """
    from launcher.planning.hardware import DEFAULT_GPU, gpu_node, login_node_partition

    flags = [name for name, value in (("--gpu", args.gpu), ("--gpu-mem", args.gpu_mem_bytes)) if value is not None]
    if args.device == "cpu":
        if flags:
            raise LaunchError(f"--device cpu plans for this machine's CPU; drop {' and '.join(flags)} or --device cpu.")
        return dataclasses.replace(probed, gpus=[]), "this machine's CPU (--device cpu)"
    if args.cluster:
        from cluster.profile import load_profile

        profile = load_profile(args.cluster)
        request.nodes = request.nodes or profile.nodes
        return profile.hardware(), f"cluster profile {profile.name}"
    if probed.has_gpu:
        return probed, "this machine's GPUs"
    assumed = "" if request.gpu else f", {DEFAULT_GPU} assumed (no --gpu)"
    if probed.slurm is None:  # a login node: its partitions say what a job would get
        partition = login_node_partition(args.partition)
        if partition is not None:
            where = f"SLURM partition {partition.partition} (sinfo)"
            if not partition.gpu_name:
                where += f"; it names no known GPU model{assumed}"
            hardware = gpu_node(partition.gpu_name or DEFAULT_GPU, partition.gpus_per_node,
                                ram_bytes=partition.ram_bytes, cpu_cores=partition.cpus)
            return hardware, where
        if args.partition:
            raise LaunchError(f"sinfo shows no GPU nodes in partition {args.partition!r} from here; check the name "
                              "with sinfo, or describe the GPUs with --gpu and --gpus-per-node.")
    if flags or request.gpus_per_node or request.nodes:
        nodes = request.nodes or 1
        return gpu_node(DEFAULT_GPU, 1 if nodes == 1 else GPUS_PER_NODE, nodes), f"the flags{assumed}"
    return None


def what_it_takes(args, request) -> int:
    """No GPUs to plan for: the fewest of each common GPU that fit, per method, as one table (or JSON)."""
    from launcher.planning.models import load_model_spec
    from launcher.planning.plan import METHODS
    from launcher.planning.sizing import what_it_takes as size

    if args.output or args.trace:
        raise LaunchError("-o and --trace need one plan, and no GPUs are described; add e.g. --gpu H100 --gpus-per-node 8, "
                          "or --cluster NAME.")
    spec = load_model_spec(request.model, request.model_overrides)
    methods = (args.method,) if args.method else METHODS
    rows = size(request, methods=methods)
    if args.plot:
        from launcher.planning.plan_plot import plot_sizing
        from launcher.planning.sizing import COMMON_GPUS, memory_curves

        plot_sizing(args.plot, f"{spec.name} ({params_text(spec)}), sequence {request.fixed().seq_len}: "
                    "memory per GPU against GPU count", memory_curves(request, methods), rows, COMMON_GPUS)
    if args.json:
        print(json.dumps({"model": spec.name, "params": spec.num_params, "active_params": spec.active_params,
                          "what_it_takes": [r.to_dict() for r in rows]}, indent=2))
        return 0
    print_sizing(spec, request, rows)
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def params_text(spec) -> str:
    """"46.7B params (12.9B active)" for a mixture of experts, "8.03B params" for a dense model."""
    active = f" ({spec.active_params / 1e9:.3g}B active)" if spec.active_params != spec.num_params else ""
    return f"{spec.num_params / 1e9:.3g}B params{active}"


def print_sizing(spec, request, rows) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{spec.name}: {params_text(spec)}, sequence {request.fixed().seq_len}: "
                        f"the fewest GPUs that fit (no GPU here or named)")
    for column in ("GPU", "method", "GPUs", "nodes", "strategy", "mb x ga", "ckpt", "peak/limit GiB", "tok/s"):
        table.add_column(column, justify="left" if column in ("GPU", "method", "strategy") else "right", no_wrap=True)
    for row in rows:
        plan = row.plan
        if plan is None:
            table.add_row(row.gpu, row.method, f">{row.tried}", "-", "does not fit", "-", "-", "-", "-", style="dim")
            continue
        table.add_row(
            row.gpu, row.method, str(row.gpus), str(plan.nodes),
            plan.strategy + (f"+off:{plan.offload}" if plan.offloads else ""),
            f"{plan.micro_batch} x {plan.gradient_accumulation_steps}", plan.activation_checkpointing,
            f"{plan.memory['reserved_bytes'] / 2**30:.1f}/{plan.memory['limit_bytes'] / 2**30:.1f}",
            f"{plan.predicted['tokens_per_s']:,.0f}",
        )
    console = Console(width=max(Console().width, 130))
    console.print(table)
    if any(row.plan is None and row.tried == 1 for row in rows):
        console.print("Tried on 1 GPU only: DDP replicates the model and a step in backward runs in one process, "
                      "so more GPUs do not make them fit.")
    console.print("One of them in full: add --gpu NAME --gpus-per-node N [--nodes K], or --cluster PROFILE; "
                  "on a SLURM login node the partition's GPUs are used.")


def add_trace(plan, request) -> dict:
    """Trace one real step with the plan's knobs and put the estimate for exactly that setup beside it: FSDP at
    the plan's world size on a fake process group, its experts split over ep; the other strategies on one
    unsharded rank. A layout whose model spans ranks (tp, pp, cp) is add_layout_trace's."""
    if plan.parallel.model_parallel > 1:
        return add_layout_trace(plan, request)
    if plan.parallel.ep_enabled and not plan.is_fsdp:
        raise LaunchError(f"--trace traces ep as the FSDP engine runs it, and {plan.strategy} does not; plan with "
                          f"--strategy fsdp, or drop --trace.")
    from launcher.planning.memory import estimate
    from launcher.planning.memory_trace import trace_peak
    from launcher.planning.models import load_model_spec
    from launcher.units import format_bytes

    spec = load_model_spec(request.model, request.model_overrides)
    fsdp = plan.is_fsdp
    world = plan.device_mesh[-1] if fsdp else 1  # HSDP's rank holds what FSDP over its shard group does
    # One step's peak: no offload, accumulation or optimizer in backward, which the trace does not model.
    setup = dataclasses.replace(plan.knobs(), strategy="fsdp" if fsdp else "ddp", nodes=1, gpus_per_node=world,
                                offload="none", gradient_accumulation_steps=1, optimizer_in_backward=False)
    traced = trace_peak(spec, setup)
    estimated = estimate(spec, setup).peak_bytes
    what = f"FSDP at {world} ranks on a fake process group" if fsdp else "1 rank unsharded"
    what += f", experts over ep {setup.parallel.ep} routed evenly" if setup.parallel.ep_enabled else ""
    plan.reasons.append(f"trace (MemTracker, fake tensors, {what}): peak {format_bytes(traced.peak_bytes)} vs "
                        f"estimate {format_bytes(estimated)} ({(estimated - traced.peak_bytes) / traced.peak_bytes:+.1%}).")
    return {"peak_bytes": traced.peak_bytes, "estimate_bytes": estimated, "strategy": setup.strategy,
            "world_size": world, "by_depth": traced.by_depth}


def add_layout_trace(plan, request) -> dict:
    """Trace one tp x pp x cp replica of the plan's layout (its first and last pipeline stage) on a fake process
    group of its ranks, and put the estimate for exactly that replica beside it: the data-parallel part, which the
    layout trace does not build, is left out of both (the traced peak is the stage whose trace is higher)."""
    from launcher.planning.memory import estimate_stage
    from launcher.planning.memory_layout import stages
    from launcher.planning.memory_sizes import ComputeMode, compute_mode
    from launcher.planning.memory_trace_layout import check_traceable, trace_layout_peak
    from launcher.planning.models import load_model_spec
    from launcher.units import format_bytes

    dims, knobs = plan.parallel, plan.knobs()
    # The sharding engines (FSDP, ZeRO) compute in bf16 / fp16 whatever they keep: so does the traced replica.
    precision = "bf16" if compute_mode(knobs) is ComputeMode.HALF and knobs.precision != "fp32" else knobs.precision
    setup = dataclasses.replace(knobs, strategy="ddp", nodes=1, gpus_per_node=dims.model_parallel, precision=precision,
                                offload="none", optimizer_in_backward=False)
    check_traceable(setup)
    spec = load_model_spec(request.model, request.model_overrides)
    traced = {stage: trace_layout_peak(spec, setup, stage) for stage in stages(setup)}
    stage = max(traced, key=lambda name: traced[name][0])
    peak, by_depth = traced[stage]
    estimated = estimate_stage(spec, setup, stage).peak_bytes
    plan.reasons.append(f"trace (MemTracker, fake tensors, one {dims.model_parallel}-rank tp x pp x cp replica of "
                        f"{dims.label()}, {stage} stage): peak {format_bytes(peak)} vs estimate "
                        f"{format_bytes(estimated)} ({(estimated - peak) / peak:+.1%}).")
    return {"peak_bytes": peak, "estimate_bytes": estimated, "strategy": setup.strategy,
            "world_size": setup.world_size, "stage": stage, "by_depth": by_depth}


def shown_candidates(candidates):
    """The fastest that fit, then per strategy the one that came closest to fitting: the table's rows and bars."""
    smallest_misses = {}
    for c in candidates:
        best = smallest_misses.get(c.setup.strategy)
        if not c.fits and (best is None or c.memory.reserved_bytes < best.memory.reserved_bytes):
            smallest_misses[c.setup.strategy] = c
    return [c for c in candidates if c.fits][:TABLE_ROWS - 5] + list(smallest_misses.values())


def is_chosen(candidate, plan) -> bool:
    s = candidate.setup
    return (s.strategy, s.offload, s.micro_batch, s.activation_checkpointing, s.gradient_accumulation_steps,
            s.parallel) == (plan.strategy, plan.offload, plan.micro_batch, plan.activation_checkpointing,
                            plan.gradient_accumulation_steps, plan.parallel)


def print_table(spec, plan, candidates) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from launcher.units import format_bytes

    gib = lambda n: f"{n / 2**30:.1f}"  # noqa: E731 - one-line column formatter
    table = Table(title=f"{spec.name}: {params_text(spec)} on {_where(plan)} (GiB per rank)")
    for column in ("strategy", "layout", "mb", "ga", "ckpt", "weights", "grads", "optim", "activ", "logits",
                   "comm", "ctx+rsv", "peak", "reserved/limit", "fits", "step s", "tok/s", "MFU"):
        table.add_column(column, justify="left" if column == "strategy" else "right", no_wrap=True)
    for c in shown_candidates(candidates):
        s, m = c.setup, c.memory
        chosen = is_chosen(c, plan)
        weights = m["weights"] + (m["frozen_weights"] if any(t.name == "frozen_weights" for t in m.terms) else 0)
        table.add_row(
            s.strategy + (f"+off:{s.offload}" if s.offloads else ""), s.parallel.label(), str(s.micro_batch),
            str(s.gradient_accumulation_steps),
            s.activation_checkpointing, gib(weights), gib(m["grads"]),
            gib(m["optimizer"] + m["optimizer_scratch"]), gib(m["activations"]), gib(m["logits_loss"]),
            gib(m["comm_buffers"]), gib(m["context_reserve"]), gib(m.peak_bytes),
            f"{gib(m.reserved_bytes)}/{gib(c.limit_bytes)}", "yes" if c.fits else "no",
            f"{c.step_time_s:.3g}", f"{c.tokens_per_s:,.0f}", f"{c.mfu:.0%}",
            style="bold green" if chosen else ("dim" if not c.fits else None),
        )
    console = Console(width=max(Console().width, 195))  # the table is wide; never squeeze it into 80 columns
    console.print(table)
    layout = "" if plan.parallel.pure_data_parallel else " " + escape(plan.parallel.label())
    console.print(f"[bold]chosen:[/bold] {plan.strategy}{layout}"
                  + (f" + offload {plan.offload}" if plan.offloads else "")
                  + f", micro-batch {plan.micro_batch} x accumulation {plan.gradient_accumulation_steps}, "
                  f"recompute {plan.activation_checkpointing}, {plan.precision}, {plan.method}; "
                  f"peak {format_bytes(plan.memory['peak_bytes'])}")
    for reason in plan.reasons:
        console.print(f"  why: {escape(reason)}")
