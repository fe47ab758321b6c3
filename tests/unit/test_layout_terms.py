"""Each memory and step-time term of a layout against its published formula (launcher/planning/memory_layout.py and
launcher/planning/step_time_layout.py), and the planner's search against brute force."""

import dataclasses
import itertools

import pytest

from launcher.planning import memory_layout as mem

from launcher.planning import step_time_layout as st
from launcher.planning.hardware import Hardware
from launcher.planning.memory import estimate, estimate_stage
from launcher.planning.memory_sizes import layer_activation_bytes, residual_bytes
from launcher.planning.models import load_model_spec
from launcher.planning.parallel import ParallelDims
from launcher.planning.plan import ENGINE_SUPPORT, TrainSetup
from launcher.planning.planner import HEADROOM, PlanRequest, _evaluate, hardware_for, make_plan, rank_candidates

SPEC = load_model_spec("8b")  # 32 layers, 32 heads, 8 KV heads, hidden 4096
BASE = dict(strategy="zero1", nodes=2, gpus_per_node=8, precision="bf16", seq_len=4096, micro_batch=1)


def setup(**knobs):
    return TrainSetup(**{**BASE, **knobs})


def test_tensor_parallel_activations_follow_korthikanti_table_2():
    """TP + SP: sbh/t (34 + ...) -> every saved tensor / t but the all-gathered inputs of the column-parallel
    blocks, which torch's DTensor saves whole; TP alone: the norm region (10 sbh) stays whole."""
    whole = layer_activation_bytes(SPEC, setup())
    with_sp = mem.layer_bytes_per_token(SPEC, setup(tp=4))
    without_sp = mem.layer_bytes_per_token(SPEC, setup(tp=4, sequence_parallel=False))
    replicated = mem.replicated_bytes_per_token(SPEC, setup())
    gathered = mem.gathered_bytes_per_token(SPEC, setup())
    assert gathered == 2 * SPEC.hidden * 2  # q/k/v's and gate/up's bf16 input
    assert with_sp == gathered + (whole - gathered) / 4
    assert without_sp == replicated + (whole - replicated) / 4
    assert with_sp < without_sp < whole


def test_full_recompute_keeps_each_layer_input_split_by_sequence_parallel():
    tokens = 4096
    saved, alive, _ = mem.layout_activation_bytes(SPEC, setup(tp=4, activation_checkpointing="full"), "first")
    assert saved == SPEC.layers * tokens * SPEC.hidden * residual_bytes(setup()) // 4
    assert alive - saved == int(mem.layer_bytes_per_token(SPEC, setup(tp=4), "none") * tokens)  # one layer recomputed


def test_selective_saves_less_than_none_and_more_than_full():
    per = {mode: mem.layer_bytes_per_token(SPEC, setup(activation_checkpointing=mode))
           for mode in ("none", "selective")}
    assert SPEC.hidden * 2 < per["selective"] < per["none"] / 2


@pytest.mark.parametrize("schedule, virtual, microbatches, first, last", [
    ("gpipe", 1, 16, 16, 16),  # GPipe: every microbatch's activations before the first backward
    ("1f1b", 1, 16, 4, 1),  # 1F1B: pp on the first stage, one on the last
    ("1f1b", 1, 2, 2, 1),  # fewer microbatches than stages
    ("interleaved-1f1b", 2, 16, 4 * (1 + 3 / 8), 1),  # p (1 + (p - 1) / (p v))
])
def test_pipeline_microbatches_in_flight_by_schedule(schedule, virtual, microbatches, first, last):
    s = setup(pp=4, pp_schedule=schedule, pp_virtual_stages=virtual, gradient_accumulation_steps=microbatches)
    assert mem.inflight_microbatches(s, "first") == pytest.approx(first)
    assert mem.inflight_microbatches(s, "last") == pytest.approx(last)


def test_layers_split_over_stages_as_torchtitan_places_them():
    """The embedding and the head count as a layer each (L + 2 spread, the remainder first): Llama 3 405B's 126
    layers over 16 stages put 7 on the first and last (its paper's "one Transformer layer fewer"), over 128
    stages (pp 16 x v 8) the first and last chunks hold only the embedding and only the head."""
    spec = load_model_spec("405b")
    assert mem.stage_layers(spec, ParallelDims(pp=16)) == (7,) + (8,) * 14 + (7,)
    llama3 = ParallelDims(pp=16, pp_schedule="interleaved-1f1b", pp_virtual_stages=8, pp_microbatches=32)
    assert mem.stage_layers(spec, llama3) == (0,) + (1,) * 126 + (0,)
    assert mem.rank_layers(spec, llama3)[:2] == [7, 8] and sum(mem.rank_layers(spec, llama3)) == 126
    assert mem.stage_layers(SPEC, ParallelDims(pp=4)) == (8, 9, 8, 7)  # 34 over 4: 9, 9, 8, 8, less the ends


def test_held_activations_follow_the_schedule_rank_by_rank():
    """1F1B: rank r holds p - r microbatches of its layers; interleaved: its warm-up forwards, chunk by chunk.
    Llama 3's layout: rank 0's first chunk is the embedding alone, so rank 1 (141 one-layer chunks) is the peak;
    with even chunks rank 0 holds Korthikanti's p (1 + (p - 1) / (pv)) microbatches of L / p layers."""
    spec = load_model_spec("405b")
    llama3 = setup(pp=16, pp_schedule="interleaved-1f1b", pp_virtual_stages=8, gradient_accumulation_steps=32)
    assert [mem._held(spec, llama3.parallel, r) for r in (0, 1, 15)] == [112, 141, 112]
    assert mem.held_layer_microbatches(spec, llama3, "first") == (141, 1)
    even = load_model_spec("405b", {"num_hidden_layers": 126})  # 128 effective layers: 16 stages of 8
    s = setup(pp=4, pp_schedule="interleaved-1f1b", pp_virtual_stages=2, gradient_accumulation_steps=8)
    spec = load_model_spec("8b", {"num_hidden_layers": 14})  # 16 effective over 8 stages: 2 each
    assert mem.stage_layers(spec, s.parallel) == (1, 2, 2, 2, 2, 2, 2, 1)
    # rank 0: 11 = p (1 + (p - 1) / (pv)) x v chunk forwards (4 on its 1-layer chunk, 4 on its 2-layer one, 3 on
    # the first again); rank 1: 2 (p - 2) + (v - 1) p + 1 = 9 forwards of 2 layers
    assert [mem._held(spec, s.parallel, r) for r in (0, 1)] == [4 + 8 + 3, 18]
    one = setup(pp=16, gradient_accumulation_steps=32)
    assert [mem._held(even, one.parallel, r) for r in (0, 1, 14)] == [7 * 16, 8 * 15, 8 * 2]


def test_pipeline_stages_hold_the_inputs_and_outputs_in_flight_and_one_receive_each_way():
    """launcher.train.pipeline_stage: each forward in flight keeps its output (not the loss) and its received
    input (not on the model's first stage, and not where a checkpointed layer or fp32 norm keeps it already),
    and a rank receives one input ahead and one gradient at a time; torch's one buffer per microbatch each way
    is gone."""
    size = 4096 * 4096 * 2  # one microbatch's hidden states, bf16
    s = setup(pp=4, gradient_accumulation_steps=8)
    assert mem.held_layer_microbatches(SPEC, s, "first")[1] == 0
    assert mem.pipeline_buffer_bytes(SPEC, s, "first") == (4 + 1) * size  # 4 outputs in flight, 1 gradient
    assert mem.pipeline_buffer_bytes(SPEC, s, "last") == (1 + 1) * size  # 1 input in flight, 1 ahead; its output is the loss
    spec = load_model_spec("405b")  # Llama 3: rank 1 of pp 16 x v 8, 32 microbatches, tp 8 + sequence parallel
    llama3 = setup(tp=8, pp=16, pp_schedule="interleaved-1f1b", pp_virtual_stages=8, gradient_accumulation_steps=32,
                   seq_len=8192)
    hidden_states = 8192 * 16384 * 2 // 8
    assert mem.pipeline_buffer_bytes(spec, llama3, "first") == (141 + 141 + 2) * hidden_states
    selective = dataclasses.replace(llama3, activation_checkpointing="selective")  # its layers keep their inputs
    assert mem.pipeline_buffer_bytes(spec, selective, "first") == (141 + 2) * hidden_states
    assert mem.pipeline_buffer_bytes(SPEC, setup(tp=2), "first") == 0


def test_pipeline_stages_hold_their_layers_and_ends():
    s = setup(pp=4, tp=2)
    per_layer = (SPEC.num_params - SPEC.embedding_params - SPEC.lm_head_params) / SPEC.layers
    first = mem.local_param_fraction(SPEC, s, "first") * SPEC.num_params * 2
    last = mem.local_param_fraction(SPEC, s, "last") * SPEC.num_params * 2
    assert first == pytest.approx(max(8 * per_layer + SPEC.embedding_params, 9 * per_layer))
    assert last == pytest.approx(7 * per_layer + SPEC.lm_head_params)
    assert mem.logits_share(s, "first") == 0 and mem.logits_share(s, "last") == 1 / 2  # vocab-parallel loss
    s = dataclasses.replace(s, gradient_accumulation_steps=8)
    stages = [estimate_stage(SPEC, s, stage) for stage in ("first", "last")]
    assert stages[0]["activations"] > stages[1]["activations"]  # 4 microbatches in flight against 1
    assert stages[1]["logits_loss"] > stages[0]["logits_loss"] == 0
    assert estimate(SPEC, s).reserved_bytes == max(m.reserved_bytes for m in stages)


def test_context_parallel_splits_the_sequence_and_holds_the_gathered_kv():
    """cp 4 of 4096 tokens: 1024 per rank, the whole sequence's bf16 K and V all-gathered for a layer's attention,
    and fp32 dQ, dK, dV of the rank's 1024 tokens."""
    plain, split = setup(), setup(cp=4)
    assert mem.local_tokens(split) == mem.local_tokens(plain) // 4 == 1024
    assert mem.cp_buffer_bytes(SPEC, plain) == 0
    kv, q = SPEC.kv_heads * SPEC.head_dim, SPEC.heads * SPEC.head_dim
    assert mem.cp_buffer_bytes(SPEC, split) == 2 * 4096 * kv * 2 + 1024 * (q + 2 * kv) * 4
    assert estimate(SPEC, split)["activations"] == estimate(SPEC, plain)["activations"] // 4


def test_pipeline_bubble_and_tensor_parallel_collectives():
    assert st.bubble_fraction(setup(pp=4, gradient_accumulation_steps=12)) == pytest.approx(3 / 12)
    assert st.bubble_fraction(setup(pp=4, gradient_accumulation_steps=12, pp_schedule="interleaved-1f1b",
                                    pp_virtual_stages=2)) == pytest.approx(3 / 24)
    hw = hardware_for(PlanRequest(gpu="H100", gpus_per_node=8), Hardware())
    s = setup(tp=4, gradient_accumulation_steps=2)
    size = 4096 * SPEC.hidden * 2
    expected = SPEC.layers * 2 * 8 * size * 3 / 4 / (hw.facts.nvlink_bytes_per_s * st.LINK_EFFICIENCY)
    assert st.tensor_parallel_seconds(SPEC, s, hw, hw.facts) == pytest.approx(expected)
    full = st.tensor_parallel_seconds(SPEC, dataclasses.replace(s, activation_checkpointing="full"), hw, hw.facts)
    assert full == pytest.approx(expected * 12 / 8)  # the recomputed forward's 4 collectives per layer again
    assert st.tensor_parallel_seconds(SPEC, setup(), hw, hw.facts) == 0


def _brute_force(spec, request, hw):
    """Every layout, strategy, micro-batch and recompute, without the search's pruning: every number of virtual
    stages up to one layer each (torchtitan's split allows (L + 2) / pp)."""
    facts, world = hw.facts, hw.nodes * hw.gpus_per_node
    best = None
    schedules = [("1f1b", 1)] + [("interleaved-1f1b", v) for v in range(2, spec.layers + 3)]
    for tp, pp, strategy, micro, mode, (schedule, v) in itertools.product(
            (1, 2, 4, 8), range(1, spec.layers + 1), ("ddp", "zero1", "zero2", "zero3", "fsdp", "hsdp"), (1, 2, 4, 8, 16, 32),
            ("none", "selective", "full"), schedules):
        if (world % (tp * pp) or (pp == 1 and v > 1) or spec.layers < 2 * pp or spec.heads % tp
                or pp * v > spec.layers + 2):
            continue
        dp = world // (tp * pp)
        if request.global_batch % (micro * dp):
            continue
        ga = request.global_batch // (micro * dp)
        pure = tp * pp == 1
        if (v > 1 and ga % pp) or (pure and mode not in ENGINE_SUPPORT[strategy].recomputes) or (
                not pure and strategy not in ("zero1", "fsdp")):
            continue
        s = TrainSetup(strategy=strategy, tp=tp, pp=pp, pp_schedule=schedule, pp_virtual_stages=v, micro_batch=micro,
                       gradient_accumulation_steps=ga, activation_checkpointing=mode, nodes=hw.nodes,
                       gpus_per_node=hw.gpus_per_node, seq_len=request.seq_len, precision="amp-bf16", offload="none")
        c = _evaluate(spec, s, hw, facts)
        if c.fits and (best is None or c.tokens_per_s > best.tokens_per_s):
            best = c
    return best


@pytest.mark.parametrize("model, overrides, gpus, nodes, batch", [
    ("8b", {"num_hidden_layers": 8}, 8, 1, 64),
    ("70b", {"num_hidden_layers": 8}, 8, 2, 32),
    ("70b", {}, 8, 4, 64),  # tp2 x pp4 (interleaved) x dp4 wins here
])
def test_search_finds_what_brute_force_finds(model, overrides, gpus, nodes, batch):
    """The planner's pruned search never misses a candidate its own model rates faster (by the layout margin's
    rule: a layout must beat data parallelism by LAYOUT_MARGIN)."""
    request = PlanRequest(model=model, model_overrides=overrides, gpu="H100", gpus_per_node=gpus, nodes=nodes,
                          global_batch=batch, seq_len=4096, offload="none")
    spec = load_model_spec(model, overrides)
    hw = hardware_for(request, Hardware())
    searched = [c for c in rank_candidates(spec, request, hw) if c.fits]
    best = _brute_force(spec, request, hw)
    assert max(c.tokens_per_s for c in searched) == pytest.approx(best.tokens_per_s)
    assert make_plan(request, Hardware()).predicted["tokens_per_s"] > 0


def test_search_weighs_the_virtual_stages_that_fit_where_the_most_do_not():
    """Llama 3 405B's layout on 8,192 GPUs at micro-batch 2 with selective recompute, on a card that holds
    101.4 GiB: more chunks per rank hold more chunk-microbatches in flight, so v <= 5 fits and v >= 6 does not,
    and the step is shorter the more chunks. The search finds v 5, between its ladder's rungs 4 and 6, as trying
    every v does."""
    request = PlanRequest(model="405b", gpu="H100", gpus_per_node=8, nodes=1024, seq_len=8192, global_batch=2048,
                          tp=8, pp=16, pp_schedule="interleaved-1f1b", strategy="zero1", micro_batch=2,
                          activation_checkpointing="selective", gpu_mem_bytes=int(101.4 * 2**30 / HEADROOM))
    spec, hw = load_model_spec("405b"), hardware_for(request, Hardware())
    searched = [c for c in rank_candidates(spec, request, hw) if c.fits]
    every = {v: _evaluate(spec, dataclasses.replace(searched[0].setup, pp_virtual_stages=v), hw, hw.facts)
             for v in range(2, (spec.layers + 2) // 16 + 1)}
    assert [v for v, c in every.items() if c.fits] == [2, 3, 4, 5]
    assert searched[0].setup.parallel.pp_virtual_stages == 5
    assert searched[0].tokens_per_s == pytest.approx(max(c.tokens_per_s for c in every.values() if c.fits))


def test_tensor_parallel_time_follows_the_gpus_nvlink():
    """H800 is an H100 with NVLink cut from 900 to 400 GB/s (bidirectional): its tp collectives take 2.25 x as long;
    L40S has no NVLink, so they cross PCIe."""
    s = setup(tp=8)
    seconds = {}
    for gpu in ("H100", "H800", "L40S"):
        hw = hardware_for(PlanRequest(gpu=gpu, gpus_per_node=8), Hardware())
        seconds[gpu] = st.tensor_parallel_seconds(SPEC, s, hw, hw.facts)
    assert seconds["H800"] == pytest.approx(seconds["H100"] * 450 / 200)
    assert seconds["L40S"] == pytest.approx(seconds["H100"] * 450 / 32)


def test_context_parallel_is_weighed_across_nodes_for_long_sequences():
    """Llama 3 ran TP8 x CP16 at 128K (arXiv 2407.21783, Table 4): cp leaves the node beside a tp that fills it,
    down to a 4K chunk per rank; tp never leaves the node, and short sequences weigh no cp."""
    from launcher.planning.layouts import layouts

    found = {(lay["tp"], lay["cp"]) for lay in layouts(SPEC, PlanRequest(seq_len=131072), 1024, 8)}
    assert {(8, 16), (8, 32), (1, 32)} <= found
    assert max(tp for tp, _ in found) == 8 and max(cp for _, cp in found) == 32
    assert {cp for _, cp in (
        (lay["tp"], lay["cp"]) for lay in layouts(SPEC, PlanRequest(seq_len=8192), 1024, 8))} == {1}
