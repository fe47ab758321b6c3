"""Which parallel layouts the planner weighs: tp in powers of two within a node that the heads allow, pp over
the world's divisors that leave each stage two or more layers, cp for long sequences (within a node and across
nodes, as Llama 3 ran CP16 beside TP8 at 128K: arXiv 2407.21783, Table 4), 1F1B and interleaved
1F1B, ep for a mixture of experts; forced dimensions are taken as given. Pruned so that 16,384 GPUs plan in
well under two seconds."""

from __future__ import annotations

from launcher.errors import LaunchError
from launcher.planning.models import ModelSpec
from launcher.planning.parallel import ParallelDims, check_expert_tp, check_layout

CP_FROM_SEQ_LEN = 32768  # context parallel is weighed from this sequence length (torchtitan's CP runs start here)
LAYOUT_STRATEGIES = ("zero1", "fsdp")  # the data-parallel part beside tp / pp: Megatron's distributed optimizer, torchtitan's FSDP
PIPELINE_SCHEDULES = (("1f1b", 1), ("interleaved-1f1b", 2))  # (schedule, virtual stages) weighed


def layouts(spec: ModelSpec, request, world: int, gpus_per_node: int) -> list[dict]:
    """The layout knobs (tp, pp, cp, ep, etp, pp_schedule, pp_virtual_stages) to weigh, pure data parallel first."""
    names = ("tp", "pp", "cp", "ep", "etp", "pp_schedule", "pp_virtual_stages")
    forced = {name: getattr(request, name) for name in names if getattr(request, name) is not None}
    out = []
    for tp in [forced["tp"]] if "tp" in forced else _powers_of_two(gpus_per_node):
        for cp in [forced["cp"]] if "cp" in forced else _cps(request.seq_len or 2048, world // tp, gpus_per_node):
            for pp in [forced["pp"]] if "pp" in forced else _pps(spec, world // (tp * cp) if world % (tp * cp) == 0 else 0):
                for schedule, virtual in _schedules(forced, pp):
                    for ep, etp in _expert_dims(spec, forced, world // (tp * pp * cp), gpus_per_node, tp, cp,
                                                tp * pp * cp == 1):
                        layout = {"tp": tp, "pp": pp, "cp": cp, "ep": ep, "etp": etp, "pp_schedule": schedule,
                                  "pp_virtual_stages": virtual}
                        cross_node = bool(forced) or (cp > 1 and tp <= gpus_per_node)
                        if _valid(spec, layout, request, world, gpus_per_node, cross_node=cross_node):
                            out.append(layout)
    return out


def check_forced(spec: ModelSpec, request, world: int, gpus_per_node: int) -> None:
    """A layout the flags force is refused in one sentence, before any search (forced dimensions may leave the node)."""
    tp, pp, cp = (getattr(request, name) or 1 for name in ("tp", "pp", "cp"))
    schedule, virtual = request.pp_schedule or "1f1b", request.pp_virtual_stages or 1
    model_parallel = tp * pp * cp
    if world % model_parallel:
        raise LaunchError(f"tp {tp} x pp {pp} x cp {cp} = {model_parallel} does not divide the {world} GPUs; choose "
                          f"sizes whose product divides the GPU count.")
    check_expert_tp(tp, request.etp or 1, request.ep if spec.moe else 1)  # beside an ep the search may choose
    dims = ParallelDims(dp_replicate=world // model_parallel, tp=tp, pp=pp, cp=cp, ep=request.ep or 1,
                        etp=(request.etp or 1) if request.ep else 1, pp_schedule=schedule,
                        pp_virtual_stages=virtual, pp_microbatches=pp)
    if dims.ep_enabled:
        dims = ParallelDims(**{**dims.to_dict(), "dp_replicate": 1, "dp_shard": dims.dp_replicate})
    check_layout(dims, world, gpus_per_node, spec=spec, seq_len=request.seq_len or 2048, cross_node=True)


def _powers_of_two(limit: int) -> list[int]:
    return [1 << i for i in range(limit.bit_length()) if 1 << i <= limit]


def _cps(seq_len: int, room: int, gpus_per_node: int) -> list[int]:
    """Powers of two up to the ranks tp leaves, from CP_FROM_SEQ_LEN on, while each rank keeps at least
    CP_FROM_SEQ_LEN / gpus_per_node tokens: the shortest chunk a node's GPUs give the shortest sequence weighed
    (pruned for search time; CP16 at 128K keeps 8K). cp may leave the node where tp may not: its ring passes one
    K, V chunk per layer (GQA makes it small) behind the chunk's attention, which grows as the square of the
    sequence (launcher.planning.step_time_layout.context_parallel_seconds weighs what is exposed), where tp's
    collectives sit between every pair of matmuls."""
    if seq_len < CP_FROM_SEQ_LEN:
        return [1]
    return [c for c in _powers_of_two(max(1, room)) if seq_len // c >= CP_FROM_SEQ_LEN // gpus_per_node]


def _pps(spec: ModelSpec, ranks: int) -> list[int]:
    """Divisors of the remaining ranks that leave each stage at least two layers."""
    if ranks < 1:
        return []
    return [p for p in range(1, min(ranks, spec.layers // 2) + 1) if ranks % p == 0] or [1]


def _expert_dims(spec: ModelSpec, forced: dict, data_parallel: int, gpus_per_node: int, tp: int, cp: int,
                 pure: bool) -> list[tuple[int, int]]:
    """(ep, etp) pairs: under tp, a mixture of experts is weighed with its experts split over tp (etp = tp: ep
    borrows dp_shard x cp) and whole on each tp rank (etp = 1: ep borrows dp_shard x cp x tp; ParallelDims.ep_span
    says which stay on NVLink); ep 1 only with etp 1 (ParallelDims._check_expert_tp). Both are run at scale:
    Megatron-Core recipes for fine-grained experts beside --tensor-model-parallel-size > 1 set
    --expert-tensor-parallel-size 1 (MindSpeed's --moe-tp-extend-ep, docs/features/megatron_moe, does so because tp
    shrinks small experts' grouped GEMMs; that efficiency is not modelled here), while big experts may need the split
    to fit; the step time and memory decide."""
    etps = [forced["etp"]] if "etp" in forced else sorted({1, tp}) if spec.moe is not None else [1]
    out = []
    for etp in etps:
        borrowed = cp if etp > 1 else cp * tp
        eps = [forced["ep"]] if "ep" in forced else _eps(spec, data_parallel * borrowed, gpus_per_node // etp, pure)
        out += [(ep, etp) for ep in eps if ep > 1 or etp == 1]
    return out


def _eps(spec: ModelSpec, ranks: int, in_node: int, pure: bool) -> list[int]:
    """ep for a mixture of experts, among the powers of two dividing the routed experts and the data-parallel x cp
    ranks it borrows (torchtitan's rule, launcher.planning.expert_parallel): the largest whose all-to-all stays on
    NVLink (where that is more than 1) and the largest of all (fewest experts per rank); 1 too beside pure data
    parallelism. A dense model: 1.
    Pruned for search time: a smaller ep of the same link that also fits moves up to half the all-to-all volume
    less and is not weighed unless forced."""
    if spec.moe is None or ranks < 1:
        return [1]
    allowed = [e for e in _powers_of_two(min(ranks, spec.moe.experts)) if spec.moe.experts % e == 0 and ranks % e == 0]
    within = [e for e in allowed if e <= in_node]
    return sorted({allowed[-1]} | {e for e in within[-1:] if e > 1} | ({1} if pure else set()))


def _schedules(forced: dict, pp: int) -> list[tuple[str, int]]:
    """1F1B and interleaved 1F1B (its number of chunks per rank is chosen per candidate:
    launcher.planning.planner.virtual_stages)."""
    if "pp_schedule" in forced:
        return [(forced["pp_schedule"], forced.get("pp_virtual_stages", 1))]
    return [("1f1b", 1)] if pp == 1 else list(PIPELINE_SCHEDULES)


def _valid(spec: ModelSpec, layout: dict, request, world: int, gpus_per_node: int, cross_node: bool) -> bool:
    model_parallel = layout["tp"] * layout["pp"] * layout["cp"]
    if world % model_parallel:
        return False
    dims = ParallelDims(dp_shard=world // model_parallel, tp=layout["tp"], pp=layout["pp"], cp=layout["cp"],
                        ep=layout["ep"], etp=layout["etp"], pp_schedule=layout["pp_schedule"],
                        pp_virtual_stages=layout["pp_virtual_stages"],
                        pp_microbatches=layout["pp"])  # the microbatch count is the candidates' (_microbatches_fit)
    try:
        check_layout(dims, world, gpus_per_node, spec=spec, seq_len=request.seq_len or 2048, cross_node=cross_node)
    except LaunchError:
        return False
    return True
