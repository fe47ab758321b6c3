"""Published at-scale training runs beside what `llaunch plan` predicts for the same layout.

Reproduce: `python bench/published_layouts.py > bench/results/published_layouts.txt` (CPU only, ~10 s);
one row by hand: `llaunch plan --model 405b --gpus 8 --nodes 1024 --gpu H100 --seq-len 8192 --global-batch 2048
--tp 8 --pp 16 --pp-schedule interleaved-1f1b --pp-virtual-stages 8 --strategy zero1 --micro-batch 1
--activation-checkpointing none --precision bf16`. Each row is one published measurement:
model, GPUs, layout, micro-batch, sequence, recompute, precision, and what was reported (model FLOPs utilization,
tokens/s per GPU, memory per GPU), with its source. llaunch's side is the planner's estimate for that exact
layout (`rank_candidates` with every knob forced), whether or not it fits the card.

Conventions. MFU here is model FLOPs (launcher.planning.models.ModelSpec.flops_per_token: 6 x matmul params + causal
attention, no recompute) / (time x peak). Megatron-LM (Narayanan et al. 2021) and BLOOM report hardware FLOPs
with full recompute (their 96 B s l h^2 formula counts 4 passes, ours 3): their utilization x 3/4 is the
model-FLOPs figure compared. torchtitan reports tokens/s per GPU; it is turned into MFU by the same FLOPs rule.
Memory: torchtitan's "Memory(GiB)" is the peak reserved by the caching allocator; llaunch's allocated peak must
not exceed it and should not fall below 0.55 of it (issue 30). fp8: torchtitan's Tables 1 and 3 (Float8 over
compiled bf16, +28 % / +29 %) calibrate launcher.planning.step_time.FP8_EFFICIENCY_RATIO; main() prints the
speed-up llaunch predicts for them (FP8_ROWS): 1.29 on 8 GPUs, but 1.07 on 128, where llaunch's FSDP
collectives (hidden behind 0.6 of the compute) surface as fp8 shortens it and torchtitan's did not. Its fp8 runs at 70B / 405B (Tables 4-6) are on the 500 W H100s
whose peak is unknown (below), so they are not banded.

Llama 3's layout (sec. 3.3.2 of the paper): interleaved 1F1B whose "first model chunk on the first stage has only
the embedding, and the last model chunk on the last stage has only output projection and loss" -- one layer per
chunk: 126 layers + embedding + head = 128 = pp 16 x v 8, torchtitan's split (launcher.planning.memory_layout).

DeepSeek-V3 (EP_ROWS, issue 32): its published layout (PP16 x EP64 x ZeRO-1, sequence 4,096, 2,048 H800) forced
with full recompute at micro-batch 1 fits 80 GB (17 GiB allocated peak); with selective recompute (DeepSeek
recomputes RMSNorm and MLA's up-projections) llaunch predicts 143 GiB reserved, as it stores every routed copy's
SwiGLU tensors (traced on fake tensors, tests/unit/test_memory_trace_moe.py) and the dropless dispatch / combine
buffers in bf16 where DeepSeek caches the SwiGLU's inputs and the experts' inputs in FP8 and recomputes the
SwiGLU's output in backward (arXiv 2412.19437 sec. 3.3.2, "Low-Precision Storage and Communication"). Predicted ~560 tokens/s per
GPU against the published 1,543 (1e12 tokens / 180K GPU hours). Where the gap is (issue 32), term by term of
llaunch's 55.1 s step for 30,720 tokens per GPU: compute 18.4 s (bf16, full recompute: 8 passes where DeepSeek
recomputes only RMSNorm and MLA's up-projections, 6), the EP all-to-all 30.2 s exposed (every top-k copy of
4,096 x 8 x 7,168 bf16 per microbatch, 6 passes, 3.6 MoE layers x 120 microbatches, at 0.8 x 50 GB/s IB per
GPU) and the 1F1B bubble 6.1 s (1/8 of both). The all-to-all is the gap: taken off the step and its bubble, as
DeepSeek's DualPipe hides it behind compute ("near-zero all-to-all communication overhead", sec. 3.2.1), the same
terms give 1,453 tokens/s per GPU, 6 % under the published figure, before FP8 GEMMs, FP8 dispatch, node-limited
routing (each token's copies cross IB to at most 4 nodes once each) or the lighter recompute. llaunch's ranks
run the all-to-all between the expert GEMMs, as torchtitan's ExpertParallel does, so the planner keeps it
exposed; the MLA FLOPs are counted as the kernel runs them (QK^T over 192, AV over 128 per head), which is 12 %
of DeepSeek-V3's 250 GFLOPs per token at 4,096 and no cause. The table prints both columns.

Rows that miss (bench/results/published_layouts.txt). Its last line of the free-choice table counts issue 30's
rules as written (MFU band, memory band where a figure is published, free choice within 0.9 of the forced MFU):
15 of 18 rows; and with the forced layout also fitting the card as llaunch's ranks would run it: 12 of 18. On MFU:
Megatron GPT 1.7B (the table gives no micro-batch; the planner's fastest is faster than what was run),
torchtitan's two H100 rows (GPUs capped at 500 W with HBM2e, whose true peak is below the SXM figure that MFU
divides by, as its footnote says). On fitting: the three Llama 3 rows are within 25 % of MFU, but their layout
without recompute does not fit 80 GB as llaunch's ranks would run it. At 8K on 8,192 GPUs rank 1 holds 141
layer-microbatches (its warm-up under interleaved 1F1B, v 8), each 9.28 h bytes per token on a tp 8 rank: the
HF / torch layer, where DTensor's sequence parallel saves the gathered q/k/v and gate/up inputs whole (4 h; the
fake-tensor traces agree) and the rest is / 8 (5.28 h, of which RMSNorm's fp32 input and output are 1.5 h):
164 GiB, plus each in-flight microbatch's stage input and output (9 GiB). Korthikanti's 1/t layer with fused bf16
norms is 38.25 h / 8 = 4.78 h for this SwiGLU + GQA block, still 84 GiB for 141 layer-microbatches before any
weight, so Meta's run must have held fewer microbatches in flight than torch's and Megatron-LM's interleaved
warm-up (the paper's schedule has a tunable N, sec. 3.3.2, unpublished beyond that) or fewer tensors per layer.
The free choice must fit, so it pays for a layout that does: selective recompute (launcher/train/recompute.py:
op-level SAC, run by the ranks and traced on fake tensors; 2.08 h per token and layer on a tp 8 rank, sequence
parallel's gathers recomputed), at pp 8 with 13 chunks per rank on 8,192 GPUs (0.91 of the forced MFU), 16 on
16,384 (0.94), and pp 8 x v 7 beside CP16 at 128K (0.96).
Pipeline receive buffers: torch 2.13's PipelineStage keeps one per microbatch for each stage's input and output
gradient for good (16 GiB per rank at Llama 3's pp 16 x v 8 x 32 microbatches); llaunch's stages
(launcher/train/pipeline_stage.py) hold one only while its microbatch needs it. With torch's, Megatron's GPT
529.6B and 1T layouts (280 and 512 microbatches) did not fit 80 GB (71 and 143 GiB); they now take 27 and 43 GiB.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.planning.hardware import Hardware  # noqa: E402
from launcher.planning.models import load_model_spec  # noqa: E402
from launcher.planning.planner import PlanRequest, hardware_for, rank_candidates  # noqa: E402

LLAMA3 = "https://arxiv.org/abs/2407.21783 (The Llama 3 Herd of Models, Table 4)"
MEGATRON = "https://arxiv.org/abs/2104.04473 (Narayanan et al. 2021, Table 1; github.com/NVIDIA/Megatron-LM README)"
TITAN_H100 = "https://github.com/pytorch/torchtitan/blob/main/benchmarks/llama3_h100_202412_torchtitan.md"
TITAN_A100 = "https://github.com/pytorch/torchtitan/blob/main/docs/performance.md (Llama 3 on 64 A100 80GB, FSDP2)"
BLOOM = "https://arxiv.org/abs/2211.05100 (BLOOM, sec. 3.4.2: 156 TFLOPs on A100, TP4 x PP12 x DP8, ZeRO-1)"
DEEPSEEK_V3 = ("https://arxiv.org/abs/2412.19437 (DeepSeek-V3 Technical Report: sec. 3.1-3.2, PP16 x EP64 x ZeRO-1 on "
               "2,048 H800; Table 1, 180K H800 GPU hours per trillion tokens)")
HARDWARE_TO_MODEL = 3 / 4  # hardware FLOPs with full recompute (8 per param per token) -> model FLOPs (6)
MEMORY_BAND = (0.55, 1.05)  # predicted allocated peak / published reserved peak (issue 30)
MFU_BAND = 0.25  # predicted MFU within 25 % of the published one
FREE_SHARE = 0.9  # the planner's free choice reaches this share of the forced layout's predicted MFU (issue 30)


def gpt(hidden: int, heads: int, layers: int, vocab: int = 51200, seq: int = 2048) -> dict:
    """Megatron's GPT shapes as a GPT-2 config (learned positions, 4h MLP)."""
    return {"n_embd": hidden, "n_head": heads, "n_layer": layers, "vocab_size": vocab, "n_positions": seq}


@dataclass
class Row:
    name: str
    model: str
    gpu: str
    nodes: int
    layout: dict  # tp, pp, cp, strategy, pp_schedule, pp_virtual_stages, sequence_parallel
    micro_batch: int | None  # None: not published, the planner's fastest for the layout
    global_batch: int  # sequences
    seq_len: int
    recompute: str
    source: str
    mfu: float | None = None  # model FLOPs utilization, published (converted where noted)
    tokens_per_gpu: float | None = None  # tokens/s per GPU, published
    memory_gib: float | None = None  # peak reserved per GPU, published
    overrides: dict = field(default_factory=dict)
    gpu_mem: str | None = None
    note: str = ""
    precision: str = "bf16"


def _megatron(name, hidden, heads, layers, tp, pp, gpus, batch, utilization):
    return Row(name, "gpt2", "A100-80GB", gpus // 8, {"tp": tp, "pp": pp, "strategy": "ddp" if tp * pp == 1 else "zero1",
               "sequence_parallel": False, "pp_schedule": "1f1b"}, None, batch, 2048, "full", MEGATRON,
               mfu=utilization * HARDWARE_TO_MODEL, overrides=gpt(hidden, heads, layers),
               note="micro-batch not in the table (planner's choice); 1F1B")


ROWS = [
    Row("Llama 3 405B, 8K, 8,192 H100", "405b", "H100", 1024, {"tp": 8, "pp": 16, "strategy": "zero1",
        "pp_schedule": "interleaved-1f1b", "pp_virtual_stages": 8}, 1, 2048, 8192, "none", LLAMA3, mfu=0.43),
    Row("Llama 3 405B, 8K, 16,384 H100", "405b", "H100", 2048, {"tp": 8, "pp": 16, "strategy": "zero1",
        "pp_schedule": "interleaved-1f1b", "pp_virtual_stages": 8}, 1, 2048, 8192, "none", LLAMA3, mfu=0.41),
    Row("Llama 3 405B, 128K (CP16), 16,384 H100", "405b", "H100", 2048, {"tp": 8, "pp": 16, "cp": 16,
        "strategy": "zero1", "pp_schedule": "interleaved-1f1b", "pp_virtual_stages": 8}, 1, 128, 131072, "none",
        LLAMA3, mfu=0.38),
    _megatron("Megatron GPT 1.7B", 2304, 24, 24, 1, 1, 32, 512, 0.44),
    _megatron("Megatron GPT 3.6B", 3072, 32, 30, 2, 1, 64, 512, 0.44),
    _megatron("Megatron GPT 7.5B", 4096, 32, 36, 4, 1, 128, 512, 0.46),
    _megatron("Megatron GPT 18.4B", 6144, 48, 40, 8, 1, 256, 1024, 0.43),
    _megatron("Megatron GPT 39.1B", 8192, 64, 48, 8, 2, 512, 1536, 0.44),
    _megatron("Megatron GPT 76.1B", 10240, 80, 60, 8, 4, 1024, 1792, 0.45),
    _megatron("Megatron GPT 145.6B", 12288, 96, 80, 8, 8, 1536, 2304, 0.47),
    _megatron("Megatron GPT 310.1B", 16384, 128, 96, 8, 16, 1920, 2160, 0.50),
    _megatron("Megatron GPT 529.6B", 20480, 128, 105, 8, 35, 2520, 2520, 0.52),
    _megatron("Megatron GPT 1T", 25600, 160, 128, 8, 64, 3072, 3072, 0.52),
    Row("BLOOM 176B, 384 A100", "gpt2", "A100-80GB", 48, {"tp": 4, "pp": 12, "strategy": "zero1",
        "sequence_parallel": False, "pp_schedule": "1f1b"}, 2, 2048, 2048, "full", BLOOM, mfu=156 / 312 * HARDWARE_TO_MODEL,
        overrides=gpt(14336, 112, 70, vocab=250880)),
    Row("torchtitan Llama 3.1 8B, FSDP 8", "8b", "H100", 1, {"strategy": "fsdp", "loss_chunk_tokens": 0},
        2, 16, 8192, "selective",
        TITAN_H100, tokens_per_gpu=5762, memory_gib=82.4, gpu_mem="96GB", note="H100 96GB HBM2e at 500 W"),
    Row("torchtitan Llama 3.1 8B, FSDP 128", "8b", "H100", 16, {"strategy": "fsdp", "loss_chunk_tokens": 0}, 2, 256, 8192, "selective",
        TITAN_H100, tokens_per_gpu=5605, memory_gib=67.0, gpu_mem="96GB", note="H100 96GB HBM2e at 500 W"),
    Row("torchtitan Llama 3 8B, FSDP 64 (A100)", "8b", "A100-80GB", 8, {"strategy": "fsdp", "loss_chunk_tokens": 0}, 1, 64, 8192,
        "selective", TITAN_A100, mfu=0.582),
    Row("torchtitan Llama 3 70B, FSDP 64 (A100)", "70b", "A100-80GB", 8, {"strategy": "fsdp", "loss_chunk_tokens": 0}, 1, 64, 8192, "full",
        TITAN_A100, mfu=0.517),
]

# Expert-parallel runs (issue 32), held to its own rule (the forced layout fits the card) and printed with the
# published and predicted tokens/s per GPU; issue 30's bands above are for the dense layouts.
EP_ROWS = [
    Row("DeepSeek-V3 671B, 2,048 H800", "deepseek-v3", "H800", 256, {"tp": 1, "pp": 16, "ep": 64, "strategy": "zero1",
        "pp_schedule": "1f1b"}, 1, 15360, 4096, "full", DEEPSEEK_V3, tokens_per_gpu=1e12 / (180e3 * 3600),
        note="FP8 GEMMs, DualPipe hides the all-to-all, node-limited routing; llaunch: bf16, all-to-all exposed"),
]


# Float8 over compiled bf16, both published (torchtitan Tables 1 and 3): (name, row to run both ways, bf16 and fp8
# tokens/s per GPU). They calibrate FP8_EFFICIENCY_RATIO; printed as a check of the formula, not of a prediction.
FP8_ROWS = [("torchtitan 8B, FSDP 8: Float8 / bf16 (compiled)", 14, 6667, 8532),
            ("torchtitan 8B, FSDP 128: Float8 / bf16 (compiled)", 15, 6514, 8380)]


def request_for(row: Row, forced: bool) -> PlanRequest:
    """The row's GPUs, batch and sequence; with `forced`, its layout, micro-batch and recompute too."""
    from launcher.units import parse_bytes

    knobs = dict(row.layout, micro_batch=row.micro_batch, activation_checkpointing=row.recompute) if forced else {
        "loss_chunk_tokens": row.layout.get("loss_chunk_tokens")}
    return PlanRequest(model=row.model, model_overrides=row.overrides, gpu=row.gpu, gpus_per_node=8, nodes=row.nodes,
                       global_batch=row.global_batch, seq_len=row.seq_len, precision=row.precision,
                       gpu_mem_bytes=parse_bytes(row.gpu_mem, "gpu_mem") if row.gpu_mem else None, **knobs)


def predict(row: Row, forced: bool = True):
    """llaunch's best candidate for the row (its exact layout when `forced`, fitting or not; else the planner's
    free choice among those that fit), with the model and the GPU's peak FLOP/s."""
    request = request_for(row, forced)
    spec = load_model_spec(row.model, row.overrides)
    hw = hardware_for(request, Hardware(cpu_cores=2))
    candidates = rank_candidates(spec, request, hw)
    candidate = candidates[0] if forced else next((c for c in candidates if c.fits), None)
    return spec, candidate, hw.facts.peak_flops[candidates[0].setup.flops_key]


def compare(row: Row, free: bool = False) -> dict:
    """One row: published and predicted MFU and memory, and whether each is within its band; with `free`, also
    what the planner chooses for the row's GPUs, batch and sequence."""
    spec, c, peak = predict(row)
    published = row.mfu if row.mfu is not None else row.tokens_per_gpu * spec.flops_per_token(row.seq_len) / peak
    out = {"name": row.name, "layout": f"{c.setup.strategy} {c.setup.parallel.label()}", "published_mfu": published,
           "mfu": c.mfu, "mfu_ok": abs(c.mfu / published - 1) <= MFU_BAND, "fits": c.fits,
           "published_gib": row.memory_gib, "peak_gib": c.memory.peak_bytes / 2**30, "memory_ok": None}
    if free:
        chosen = predict(row, forced=False)[1]
        out["free"] = f"{chosen.setup.strategy} {chosen.setup.parallel.label()}" if chosen else "nothing fits"
        out["free_mfu"] = chosen.mfu if chosen else 0.0
    if row.memory_gib:
        out["memory_ok"] = MEMORY_BAND[0] <= out["peak_gib"] / row.memory_gib <= MEMORY_BAND[1]
    return out


def within_bands(results: list[dict]) -> float:
    """The share of rows whose MFU, and memory where published, are within their bands (issue 30 asks 80 %)."""
    good = [r for r in results if r["mfu_ok"] and r["memory_ok"] is not False]
    return len(good) / len(results)


def meets_issue_rules(result: dict, fits: bool = False) -> bool:
    """Issue 30's rules for one row compared with `free`: MFU within its band, memory within its band where
    published, the free choice at least FREE_SHARE of the forced layout's MFU; with `fits`, also the forced layout
    fitting the card as llaunch's ranks would run it (the published runs did fit theirs)."""
    return (result["mfu_ok"] and result["memory_ok"] is not False and result["free_mfu"] >= FREE_SHARE * result["mfu"]
            and (result["fits"] or not fits))


def main() -> int:
    results = [compare(row, free=True) for row in ROWS]
    print(f"{'run':42} {'llaunch layout':40} {'MFU pub':>7} {'llaunch':>7} {'GiB pub':>7} {'llaunch':>7}  ok")
    for r in results:
        memory = f"{r['published_gib']:7.1f} {r['peak_gib']:7.1f}" if r["published_gib"] else f"{'-':>7} {r['peak_gib']:7.1f}"
        ok = "yes" if r["mfu_ok"] and r["memory_ok"] is not False else "no"
        print(f"{r['name']:42} {r['layout']:40} {r['published_mfu']:7.3f} {r['mfu']:7.3f} {memory}  {ok}"
              + ("" if r["fits"] else " (does not fit)"))
    ratios = sorted(r["published_mfu"] / r["mfu"] for r in results)
    print(f"within the bands: {within_bands(results):.0%} of {len(results)} rows; published / predicted MFU: median "
          f"{ratios[len(ratios) // 2]:.2f}")
    print(f"\n{'run':42} {'llaunch free choice':44} {'MFU':>6} {'/ forced':>8}")
    for r in results:
        print(f"{r['name']:42} {r['free']:44} {r['free_mfu']:6.3f} {r['free_mfu'] / r['mfu']:8.2f}")
    free_ok = sum(r["free_mfu"] >= FREE_SHARE * r["mfu"] for r in results)
    written, strict = (sum(meets_issue_rules(r, fits) for r in results) for fits in (False, True))
    print(f"free choice >= {FREE_SHARE} x forced: {free_ok} of {len(results)} rows; all of issue 30's rules (MFU and "
          f"published-memory bands, free choice): {written} of {len(results)} ({written / len(results):.0%}); and "
          f"the forced layout fitting the card as llaunch's ranks run it: {strict} of {len(results)} "
          f"({strict / len(results):.0%})")
    print(f"\n{'fp8 speed-up':50} {'published':>9} {'llaunch':>7}")
    for name, index, bf16, fp8 in FP8_ROWS:
        row = ROWS[index]
        speeds = [predict(dataclasses.replace(row, precision=p))[1].tokens_per_s for p in ("amp-bf16", "fp8")]
        print(f"{name:50} {fp8 / bf16:9.2f} {speeds[1] / speeds[0]:7.2f}")
    print(f"\n{'expert-parallel run':42} {'llaunch layout':40} {'tok/s/GPU pub':>13} {'llaunch':>7} {'a2a hidden':>10} "
          f"{'peak GiB':>8}  fits")
    for row in EP_ROWS:
        _, c, _ = predict(row)
        print(f"{row.name:42} {c.setup.strategy + ' ' + c.setup.parallel.label():40} {row.tokens_per_gpu:13,.0f} "
              f"{c.tokens_per_s / c.setup.world_size:7,.0f} {all_to_all_hidden_tokens_per_gpu(row, c):10,.0f} "
              f"{c.memory.peak_bytes / 2**30:8.1f}  {'yes' if c.fits else 'no'}")
    return 0


def all_to_all_hidden_tokens_per_gpu(row: Row, c) -> float:
    """Tokens/s per GPU of the same prediction with ep's all-to-all taken off the step and out of the bubble it
    stretches, as DeepSeek-V3's DualPipe hides it behind compute ("near-zero all-to-all communication overhead",
    arXiv 2412.19437 sec. 3.2.1). llaunch's ranks do not overlap it (launcher/train/expert_parallel.py), so the
    planner keeps it exposed: this is the published run's schedule on llaunch's other terms, not a prediction."""
    from launcher.planning.step_time import expert_all_to_all_seconds
    from launcher.planning.step_time_layout import bubble_fraction

    spec = load_model_spec(row.model, row.overrides)
    hw = hardware_for(request_for(row, True), Hardware(cpu_cores=2))
    all_to_all = expert_all_to_all_seconds(spec, c.setup, hw, hw.facts)
    step = c.step_time_s - all_to_all * (1 + bubble_fraction(c.setup))
    return c.tokens_per_s * c.step_time_s / step / c.setup.world_size


if __name__ == "__main__":
    sys.exit(main())
