"""Choose how to run a job: enumerate candidates, estimate each one's memory and step time, pick the fastest
that fits with headroom, and say why. Flags force a knob; a None field lets the planner choose it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from launcher.errors import LaunchError
from launcher.planning import expert_parallel as experts
from launcher.planning import step_time
from launcher.planning.hardware import ASSUMED_NODE_RAM, DEFAULT_GPU, Hardware, require_gpu_name
from launcher.planning.memory import MemoryBreakdown, estimate
from launcher.planning.models import ModelSpec, load_model_spec
from launcher.planning.layouts import LAYOUT_STRATEGIES, check_forced, layouts
from launcher.planning.parallel import CP_REFUSAL, RECOMPUTES
from launcher.planning.plan import (ENGINE_SUPPORT, LAYOUT_KNOBS, LORA_METHODS, OFFLOADS, STRATEGIES,
                                    STRATEGY_ORDER, Plan, TrainSetup, can_run, check_offload)
from launcher.planning.plan_reasons import plan_reasons
from launcher.planning.request import PlanRequest
from launcher.planning.virtual_stages import weigh_virtual_stages
from launcher.units import format_bytes

HEADROOM = 0.95  # plan to at most 95% of the card: the estimate's error bound plus NCCL's own buffers
CPU_FLOPS_PER_CORE = 20e9  # fp32 FLOP/s per core for CPU plans (order of magnitude; CPU plans are for tests)
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
OFFLOADING = ("zero2", "zero3", "fsdp")  # weighed for an offload: ZeRO-2 the optimizer, ZeRO-3 and FSDP parameters too
# A layout with tp / pp / cp is recommended over data parallelism only when the step-time model rates it this much
# faster: its collectives are the model's least certain terms, and data parallelism is what `llaunch run` runs.
LAYOUT_MARGIN = 0.10


@dataclass
class Candidate:
    setup: TrainSetup
    memory: MemoryBreakdown
    limit_bytes: int
    step_time_s: float
    tokens_per_s: float
    mfu: float
    time_terms: dict[str, float]

    host_limit_bytes: int = 0
    paged_to_host_bytes: int = 0  # a paged optimizer's states that the GPU cannot keep (MemoryBreakdown.paged_to_host)

    @property
    def host_bytes(self) -> int:
        """Host RAM per rank for what lives off the GPU: offloaded states and paged-out optimizer states."""
        return self.memory.host_offload_bytes + self.paged_to_host_bytes

    @property
    def fits(self) -> bool:
        host_ok = self.host_bytes <= self.host_limit_bytes or not self.host_bytes
        return self.memory.reserved_bytes <= self.limit_bytes and host_ok

    @property
    def label(self) -> str:
        s = self.setup
        off = f"+off:{s.offload}" if s.offloads else ""
        layout = "" if s.parallel.pure_data_parallel else f" {s.parallel.label()}"
        return f"{s.strategy}{off}{layout} mb={s.micro_batch} ga={s.gradient_accumulation_steps} ckpt={s.activation_checkpointing}"


def hardware_for(request: PlanRequest, probed: Hardware) -> Hardware:
    """The machine to plan for: the probe (or GPU nodes described elsewhere), with --gpus-per-node/--nodes/--gpu/--gpu-mem
    describing one we are not on. Without GPUs, --gpus-per-node alone means that many CPU processes."""
    hw = dataclasses.replace(probed)
    named = request.gpu is not None or request.gpu_mem_bytes is not None
    if named and not probed.has_gpu:
        hw.ram_bytes = ASSUMED_NODE_RAM  # describing a remote GPU node: this machine's RAM says nothing about it
    if request.nodes is not None:
        hw.nodes = request.nodes
    if request.gpu is not None:
        facts = require_gpu_name(request.gpu)
        hw.gpu_name_override = facts.key
        hw.gpu_mem_override = request.gpu_mem_bytes or facts.memory_bytes
    elif request.gpu_mem_bytes is not None:
        hw.gpu_mem_override = request.gpu_mem_bytes
        hw.gpu_name_override = probed.gpu_name or DEFAULT_GPU
    if named or (request.gpus_per_node is not None and probed.has_gpu):
        hw.gpus_per_node_override = request.gpus_per_node or probed.gpus_per_node or 1
    return hw


def make_plan(request: PlanRequest, hardware: Hardware) -> Plan:
    """The chosen (or forced) plan; LaunchError naming the smallest change that fits when nothing does."""
    request.validate()
    spec = load_model_spec(request.model, request.model_overrides)
    hw = hardware_for(request, hardware)
    _check_forced_offload(request)
    if request.runnable_only:
        experts.check_ep_runs(spec, request.ep or 1, request.method or "full", request.lora_targets or ["all-linear"])
    candidates = rank_candidates(spec, request, hw)
    if not candidates:
        world = (hw.nodes * hw.gpus_per_node) if hw.has_gpu else (request.nodes or 1) * (request.gpus_per_node or 1)
        ranks = world // ((request.tp or 1) * (request.pp or 1) * (request.cp or 1))
        what = f"{ranks} data-parallel rank(s) (the {world} GPUs over tp x pp x cp)" if ranks != world else f"{world} rank(s)"
        raise LaunchError(f"the global batch cannot be split into micro-batch x gradient accumulation x {what} "
                          f"with the sizes given; choose a global batch that is a multiple of them.")
    candidates[0].setup.validate()  # a forced knob this hardware cannot run: its own rule says why, not a fit
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        raise LaunchError(_nothing_fits(spec, request, hw, candidates))
    return _to_plan(spec, request, hw, fitting[0], candidates)


def _check_forced_offload(request: PlanRequest) -> None:
    """A forced offload that the forced strategy, or every strategy able to step in backward, cannot do."""
    offload = request.offload
    if offload in (None, "none"):
        return
    if request.strategy:
        check_offload(request.strategy, offload)
    if request.optimizer_in_backward and not any(can.optimizer_in_backward and offload in can.offloads
                                                 for can in ENGINE_SUPPORT.values()):
        raise LaunchError("optimizer_in_backward steps each weight on the GPU as its gradient is ready, so nothing "
                          "is offloaded; drop --offload, or drop --optimizer-in-backward to offload the optimizer.")


def rank_candidates(spec: ModelSpec, request: PlanRequest, hw: Hardware) -> list[Candidate]:
    """Every combination the flags leave open, fitting ones first, fastest first."""
    request.validate()
    if request.optimizer_in_backward:  # one optimizer step per backward: no accumulation unless forced (refused)
        request = dataclasses.replace(request, gradient_accumulation_steps=request.gradient_accumulation_steps or 1)
    if not hw.has_gpu:  # fp8 too: torch._scaled_mm has a CPU kernel (launcher/train/float8.py)
        if (request.cp or 1) > 1:
            raise LaunchError(CP_REFUSAL)
        runnable = sorted({name for support in ENGINE_SUPPORT.values() for name in support.layouts})
        if unrun := [name for name in _forced_layouts(request) if name not in runnable]:
            also = "".join(f", --{name}" for name in runnable)
            raise LaunchError(f"a CPU plan runs data parallelism{also} only; drop --{' / --'.join(unrun)}, or "
                              f"describe GPUs with --gpu and --gpus-per-node.")
        check_forced(spec, request, (request.nodes or 1) * (request.gpus_per_node or 1), request.gpus_per_node or 1)
        cpu = _cpu_candidate(spec, request, hw)
        return [cpu] if cpu is not None else []
    world = hw.nodes * hw.gpus_per_node
    facts = hw.facts or require_gpu_name(hw.gpu_name)
    fixed = request.fixed()
    precision = request.precision or _default_precision(fixed.method, facts)
    if precision == "fp8":
        _check_fp8(facts, fixed.offload)
    # HSDP differs from FSDP only across nodes: on one node its mesh is FSDP's. A QLoRA base runs only under
    # the engines that declare a quantized base (launcher.planning.plan.ENGINE_SUPPORT).
    weighed = [s for s in STRATEGIES if (s != "hsdp" or hw.nodes > 1)
               and (fixed.method != "qlora" or ENGINE_SUPPORT[s].quantized_base)
               and (not fixed.optimizer_in_backward or ENGINE_SUPPORT[s].optimizer_in_backward)]
    strategies = [request.strategy] if request.strategy else (weighed if world > 1 else ["ddp"])
    check_forced(spec, request, world, hw.gpus_per_node)
    out = []
    # What `llaunch run` trains: the layout the flags force, not a search over those the engines cannot run.
    runnable = [{k: v for k, v in fixed.parallel.to_dict().items() if k in LAYOUT_KNOBS}]
    for layout in layouts(spec, request, world, hw.gpus_per_node) if not request.runnable_only else runnable:
        model_parallel = layout.get("tp", 1) * layout.get("pp", 1) * layout.get("cp", 1)
        pure = model_parallel == 1 and layout.get("ep", request.ep or 1) == 1
        base = dataclasses.replace(fixed, precision=precision, nodes=hw.nodes, gpus_per_node=hw.gpus_per_node,
                                   device="cuda", **layout)
        chosen = strategies if pure or request.strategy else [s for s in LAYOUT_STRATEGIES if s in weighed]
        if request.runnable_only and not pure:
            chosen = [s for s in chosen if can_run(s, base.parallel)] or [s for s in weighed if can_run(s, base.parallel)]
        # Offloading candidates: ZeRO-2 for the optimizer alone, ZeRO-3 and FSDP for parameters too, each where
        # it can run this method.
        offloading = [s for s in OFFLOADING if s in weighed]
        out += _candidates(spec, request, hw, facts, base, (chosen, offloading), world // model_parallel, pure)
    out.sort(key=lambda c: (not c.fits, -c.tokens_per_s / (1 + LAYOUT_MARGIN * (not c.setup.parallel.pure_data_parallel)),
                            STRATEGY_ORDER[c.setup.strategy], c.setup.parallel.model_parallel,
                            RECOMPUTES.index(c.setup.activation_checkpointing)))
    return out


def _candidates(spec: ModelSpec, request: PlanRequest, hw: Hardware, facts, base: TrainSetup,
                strategies: tuple[list[str], list[str]], data_parallel: int, pure: bool) -> list[Candidate]:
    """One layout's candidates: strategy x offload x micro-batch x recompute. Offload is weighed for pure data
    parallelism only; there, and for `llaunch run`, only the recompute modes the strategy's engine runs, so a
    data-parallel plan stays one `llaunch run` runs."""
    checkpointing = [request.activation_checkpointing] if request.activation_checkpointing is not None else RECOMPUTES
    micro_batches = [request.micro_batch] if request.micro_batch else list(MICRO_BATCHES)
    out, (plain, offloading) = [], strategies
    for offload in _offloads(request, data_parallel) if pure else [request.offload or "none"]:
        for strategy in plain if offload == "none" or request.strategy else offloading:
            # ZeRO-3 offloading only its optimizer is weighed when asked for: chosen, ZeRO-2 does that for less.
            unasked = (strategy, offload) == ("zero3", "optimizer") and not request.strategy
            if offload not in ENGINE_SUPPORT[strategy].offloads or unasked:
                continue
            runs = request.activation_checkpointing is None and (pure or request.runnable_only)
            modes = [m for m in checkpointing if m in ENGINE_SUPPORT[strategy].recomputes] if runs else checkpointing
            for micro in micro_batches:
                accumulation = _accumulation(request, micro, data_parallel, base.seq_len)
                if accumulation is None or not _microbatches_fit(base, accumulation):
                    continue
                for ckpt in modes:
                    setup = dataclasses.replace(base, strategy=strategy, offload=offload, activation_checkpointing=ckpt,
                                                micro_batch=micro, gradient_accumulation_steps=accumulation)
                    out += weigh_virtual_stages(spec, _evaluate(spec, setup, hw, facts), request, hw, facts, _evaluate)
        if any(c.fits for c in out) and request.offload is None:
            break  # offload only when nothing fits without it: it always costs time
    return out


def _microbatches_fit(base: TrainSetup, accumulation: int) -> bool:
    """Interleaved 1F1B runs its microbatches in rounds of pp."""
    return base.pp_schedule != "interleaved-1f1b" or base.pp == 1 or accumulation % base.pp == 0


def _offloads(request: PlanRequest, world: int) -> list[str]:
    if request.offload is not None:
        return [request.offload]
    if request.strategy is not None:
        return list(ENGINE_SUPPORT[request.strategy].offloads)
    return list(OFFLOADS)


def _check_fp8(facts, offload: str) -> None:
    """fp8 on GPUs: fp8 tensor cores, and an engine that converts to float8 (ENGINE_SUPPORT) and offloads as asked."""
    if not facts.peak_flops["fp8"]:
        raise LaunchError(f"--precision fp8 needs fp8 tensor cores (Hopper, Ada or Blackwell), which the {facts.key} "
                          f"does not have; use --precision amp-bf16.")
    if not any(can.float8 and offload in can.offloads for can in ENGINE_SUPPORT.values()):
        raise LaunchError(f"fp8 runs under ddp / fsdp / hsdp, none of which offloads {offload} alone; use "
                          f"--offload optimizer+params (FSDP2) or --precision amp-bf16.")


def _default_precision(method: str, facts) -> str:
    """Full fine-tunes keep fp32 master weights (amp); adapters train over a bf16 base like PEFT recipes do."""
    half = "bf16" if facts.peak_flops["bf16"] > 0 else "fp16"
    if method in LORA_METHODS:
        return "bf16" if half == "bf16" else "amp-fp16"
    return f"amp-{half}"


def _accumulation(request: PlanRequest, micro: int, world: int, seq_len: int) -> int | None:
    """Gradient accumulation so that micro x accumulation x world = the global batch; None if it cannot divide."""
    global_batch = request.global_batch
    if request.global_batch_tokens is not None:
        global_batch = max(1, request.global_batch_tokens // seq_len)
    if request.gradient_accumulation_steps is not None:
        forced = request.gradient_accumulation_steps
        return forced if global_batch is None or global_batch == micro * world * forced else None
    if global_batch is None:
        return 1
    if global_batch % (micro * world):
        return None
    return global_batch // (micro * world)


def _evaluate(spec: ModelSpec, setup: TrainSetup, hw: Hardware, facts) -> Candidate:
    memory = estimate(spec, setup)
    limit = int(hw.gpu_mem_bytes * HEADROOM)
    paged_to_host = memory.paged_to_host(limit)
    terms = step_time.step_time_terms(spec, setup, hw, facts)
    terms["offload_s"] += step_time.paging_seconds(paged_to_host, facts)
    step = terms["compute_s"] + terms["exposed_comm_s"] + terms["bubble_s"] + terms["offload_s"]
    tokens = setup.micro_batch * setup.seq_len * setup.gradient_accumulation_steps * setup.parallel.dp
    peak = facts.peak_flops[setup.flops_key]
    model_flops = spec.flops_per_token(setup.seq_len) * tokens
    mfu = model_flops / (step * peak * setup.world_size) if step > 0 else 0.0
    host_limit = int(hw.ram_bytes * HEADROOM / max(1, hw.gpus_per_node))
    return Candidate(setup=setup, memory=memory, limit_bytes=limit, step_time_s=step, tokens_per_s=tokens / step,
                     mfu=mfu, time_terms=terms, host_limit_bytes=host_limit, paged_to_host_bytes=paged_to_host)


def _cpu_candidate(spec: ModelSpec, request: PlanRequest, hw: Hardware) -> Candidate | None:
    """No GPU: one plan of N gloo processes in fp32, checked against host RAM split over them."""
    processes = request.gpus_per_node or 1
    micro = request.micro_batch or 1
    fixed = request.fixed()
    world = processes * (request.nodes or 1) // fixed.parallel.model_parallel  # the data-parallel ranks
    accumulation = _accumulation(request, micro, world, fixed.seq_len)
    if accumulation is None or not _microbatches_fit(fixed, accumulation):
        return None
    offload = request.offload or "none"
    # a forced offload or layout with the strategy left open: the first that can do it and run this method
    forced = set(_forced_layouts(request))
    able = [s for s in (OFFLOADING if offload != "none" else STRATEGIES) if offload in ENGINE_SUPPORT[s].offloads
            and (fixed.method != "qlora" or ENGINE_SUPPORT[s].quantized_base) and forced <= set(ENGINE_SUPPORT[s].layouts)]
    strategy = request.strategy or ("ddp" if (offload == "none" and not forced) or not able else able[0])
    setup = dataclasses.replace(
        fixed, strategy=strategy, offload=offload,
        precision=request.precision or "fp32", activation_checkpointing=request.activation_checkpointing or "none",
        micro_batch=micro, gradient_accumulation_steps=accumulation, nodes=request.nodes or 1,
        gpus_per_node=processes, device="cpu")
    memory = estimate(spec, setup)
    ram = hw.ram_available_bytes or hw.ram_bytes
    limit = int(ram * HEADROOM / processes)
    flops = spec.flops_per_token(setup.seq_len) * micro * setup.seq_len * setup.gradient_accumulation_steps
    step = flops / (CPU_FLOPS_PER_CORE * max(1, hw.cpu_cores // processes))
    tokens = micro * setup.seq_len * setup.gradient_accumulation_steps * world
    # On CPU "offloaded" state stays in the same RAM: together with the rest it must fit the process's share.
    return Candidate(setup=setup, memory=memory, limit_bytes=limit, step_time_s=step, tokens_per_s=tokens / step,
                     mfu=0.0, time_terms={"compute_s": step, "comm_s": 0.0, "exposed_comm_s": 0.0, "bubble_s": 0.0,
                                          "offload_s": 0.0},
                     host_limit_bytes=max(0, limit - memory.reserved_bytes))


def _forced_layouts(request: PlanRequest) -> list[str]:
    """The model-parallel dimensions a request forces above 1 (tp, pp, cp, ep)."""
    return [name for name in ("tp", "pp", "cp", "ep") if (getattr(request, name) or 1) > 1]


def _to_plan(spec: ModelSpec, request: PlanRequest, hw: Hardware, chosen: Candidate, candidates: list[Candidate]) -> Plan:
    s = chosen.setup
    cpu = s.device == "cpu"
    memory = chosen.memory.to_dict()
    memory["limit_bytes"] = chosen.limit_bytes
    plan = Plan(
        **dataclasses.asdict(s), model=request.model, params=spec.num_params,
        active_params=spec.active_params, gpu_name="" if cpu else hw.gpu_name,
        gpu_mem_bytes=0 if cpu else hw.gpu_mem_bytes, memory=memory,
        predicted={"step_time_s": round(chosen.step_time_s, 6), "tokens_per_s": round(chosen.tokens_per_s, 1),
                   "mfu": round(chosen.mfu, 4)},
        reasons=plan_reasons(chosen, candidates),
    )
    return plan.validate()


def _nothing_fits(spec: ModelSpec, request: PlanRequest, hw: Hardware, candidates: list[Candidate]) -> str:
    """One sentence naming the smallest change that fits, trying the cheapest changes first."""
    best = min(candidates, key=lambda c: c.memory.reserved_bytes)
    unit = "process" if best.setup.device == "cpu" else "GPU"
    if best.memory.reserved_bytes <= best.limit_bytes:  # fits the card; the CPU offload target is too small
        base = (f"{spec.name} does not fit: {best.label} needs {format_bytes(best.host_bytes)} of host "
                f"RAM per {unit} for offload but {format_bytes(best.host_limit_bytes)} is available")
    else:
        base = (f"{spec.name} does not fit: the smallest candidate ({best.label}) needs "
                f"{format_bytes(best.memory.reserved_bytes)} per {unit} but {format_bytes(best.limit_bytes)} is available")
    for change, tweak in _changes(request, hw):
        trial = dataclasses.replace(request, **tweak.get("request", {}))
        trial_hw = dataclasses.replace(hw, **tweak.get("hardware", {}))
        try:
            if any(c.fits and _accepted(c.setup) for c in rank_candidates(spec, trial, trial_hw)):
                return f"{base}; {change}."
        except LaunchError:
            continue
    return f"{base}; no single change (more GPUs, offload, LoRA/QLoRA, shorter sequence) makes it fit."


def _accepted(setup: TrainSetup) -> bool:
    """Advice names only a change whose plan the rules accept (Plan.validate), not one merely fitting."""
    try:
        setup.validate()
    except LaunchError:
        return False
    return True


def _changes(request: PlanRequest, hw: Hardware):
    if request.activation_checkpointing == "none":
        yield "turn on --activation-checkpointing", {"request": {"activation_checkpointing": None}}
    if request.micro_batch and request.micro_batch > 1:
        yield "use --micro-batch 1", {"request": {"micro_batch": 1, "global_batch": None, "global_batch_tokens": None}}
    fixed = request.fixed()
    if (hw.has_gpu and hw.nodes * hw.gpus_per_node == 1 and fixed.method == "full" and not fixed.optimizer_in_backward
            and request.strategy in (None, "ddp") and request.offload in (None, "none")):
        # torchtune's single-GPU full fine-tune: bf16 weights, 8-bit states paged to host RAM, each weight
        # stepped as its gradient is ready (no full set of gradients)
        yield ("train in bf16 with paged 8-bit AdamW stepped in backward (--precision bf16 --optimizer "
               "paged_adamw_8bit --optimizer-in-backward)",
               {"request": {"precision": "bf16", "optimizer": "paged_adamw_8bit", "optimizer_in_backward": True,
                            "gradient_accumulation_steps": None, "global_batch": None, "global_batch_tokens": None}})
    if hw.has_gpu and request.offload in (None, "none"):
        if request.strategy in (None, "zero3"):
            yield "add --strategy zero3 --offload optimizer+params", {"request": {"strategy": "zero3", "offload": "optimizer+params"}}
        elif request.strategy == "zero2":
            yield "add --offload optimizer", {"request": {"offload": "optimizer"}}
    if hw.has_gpu:
        for gpus in (2, 4, 8):
            if gpus > hw.gpus_per_node:
                yield f"use {gpus} GPUs per node (--gpus-per-node {gpus})", {"hardware": {"gpus_per_node_override": gpus}}
        for nodes in (2, 4, 8, 16, 32):
            if nodes > hw.nodes:
                yield f"use {nodes} nodes of {max(hw.gpus_per_node, 8)} GPUs (--nodes {nodes})", {"hardware": {"nodes": nodes, "gpus_per_node_override": max(hw.gpus_per_node, 8)}}
    if fixed.method == "full":
        yield "fine-tune with --method lora", {"request": {"method": "lora"}}
    if fixed.method != "qlora":
        yield "fine-tune with --method qlora", {"request": {"method": "qlora"}}
    seq = fixed.seq_len // 2
    while seq >= 256:
        yield f"use --seq-len {seq}", {"request": {"seq_len": seq}}
        seq //= 2
