"""The layout estimator's terms held against MemTracker tracing one rank of a tp / pp layout on fake tensors, on a
fake process group at the layout's world size (launcher/planning/memory_trace_layout.py)."""

import json

import pytest

from launcher.cli import main
from launcher.errors import LaunchError
from launcher.planning.hardware import Hardware
from launcher.planning.memory import estimate_stage
from launcher.planning.memory_trace_layout import check_traceable, traced_layout_peak
from launcher.planning.models import load_model_spec
from launcher.planning.plan import TrainSetup

# TinyLlama's width cut to 2 layers, with 8 KV heads so that tp 8 splits them (4 would be replicated).
CUT = {"num_hidden_layers": 2, "num_key_value_heads": 8}
SPEC = load_model_spec("tinyllama-1.1b", CUT)


def layout(**knobs) -> TrainSetup:
    world = knobs.get("tp", 1) * knobs.get("pp", 1)
    return TrainSetup(strategy="ddp", gpus_per_node=world, precision="bf16", micro_batch=2, seq_len=2048,
                      device="cpu", **knobs)


@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("sequence_parallel", [True, False])
def test_tensor_parallel_estimate_agrees_with_a_dtensor_trace(tp, sequence_parallel):
    """Korthikanti's activations per layer under torch's TP (the gathered column-parallel inputs saved whole
    with sequence parallel), the vocab-parallel logits, the final norm's and head's inputs: within 5 %."""
    setup = layout(tp=tp, sequence_parallel=sequence_parallel)
    traced = traced_layout_peak(SPEC, setup, SPEC.layers, "first")
    assert estimate_stage(SPEC, setup, "first").peak_bytes == pytest.approx(traced, rel=0.05)


@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("sequence_parallel", [True, False])
def test_one_layer_adds_what_the_estimate_adds_under_tensor_parallel(tp, sequence_parallel):
    """The activation term alone: what a second decoder layer adds to the traced peak (its saved activations,
    weights and optimizer states on this tp rank) against what it adds to the estimate, within 5 %."""
    setup = layout(tp=tp, sequence_parallel=sequence_parallel)
    traced = [traced_layout_peak(SPEC, setup, depth, "first") for depth in (1, 2)]
    cut = [load_model_spec("tinyllama-1.1b", {**CUT, "num_hidden_layers": depth}) for depth in (1, 2)]
    estimated = [estimate_stage(spec, setup, "first").peak_bytes for spec in cut]
    assert estimated[1] - estimated[0] == pytest.approx(traced[1] - traced[0], rel=0.05)


@pytest.mark.parametrize("tp, sequence_parallel", [(2, True), (4, True), (8, True), (2, False), (4, False)])
def test_selective_recompute_keeps_what_the_estimate_counts_under_tensor_parallel(tp, sequence_parallel):
    """Op-level SAC (launcher/train/recompute.py) traced with the ranks' DTensor plan: what a second layer adds is
    the estimate's (the layer's input, SDPA's output, q, v and gate / t, the reduce-scatters' outputs / t; not
    down's output, a whole partial sum on each rank; the sequence-parallel all-gathers recomputed), within 5 %;
    and at tp 2 and 4 with sequence parallel, as the planner runs tp, the whole rank's peak too. At tp 8 the
    loss's logits are most of this cut model's peak: the estimate is 6 % over it (4 % without recompute), and
    without sequence parallel the second layer moves the traced peak by 14 % less than it holds."""
    setup = layout(tp=tp, sequence_parallel=sequence_parallel, activation_checkpointing="selective")
    traced = [traced_layout_peak(SPEC, setup, depth, "first") for depth in (1, 2)]
    cut = [load_model_spec("tinyllama-1.1b", {**CUT, "num_hidden_layers": depth}) for depth in (1, 2)]
    estimated = [estimate_stage(spec, setup, "first").peak_bytes for spec in cut]
    assert estimated[1] - estimated[0] == pytest.approx(traced[1] - traced[0], rel=0.05)
    if sequence_parallel and tp < 8:
        assert estimated[1] == pytest.approx(traced[1], rel=0.05)


@pytest.mark.parametrize("stage", ["first", "last"])
def test_pipeline_stage_estimate_agrees_with_a_1f1b_trace_under_selective_recompute(stage):
    """1F1B with op-level SAC: each stage's in-flight microbatches keep only SAC's tensors, and one layer's
    backward runs its forward again beside them: within 5 %."""
    setup = layout(pp=2, pp_schedule="1f1b", gradient_accumulation_steps=4, activation_checkpointing="selective")
    traced = traced_layout_peak(SPEC, setup, SPEC.layers // 2, stage)
    assert estimate_stage(SPEC, setup, stage).peak_bytes == pytest.approx(traced, rel=0.05)


@pytest.mark.parametrize("stage", ["first", "last"])
def test_pipeline_stage_estimate_agrees_with_a_gpipe_trace(stage):
    """GPipe keeps all 4 microbatches in flight on both stages: the first stage's embedding and layers, the last
    stage's layers, head and a saved log-softmax per microbatch, within 5 %."""
    setup = layout(pp=2, pp_schedule="gpipe", gradient_accumulation_steps=4)
    traced = traced_layout_peak(SPEC, setup, SPEC.layers // 2, stage)
    assert estimate_stage(SPEC, setup, stage).peak_bytes == pytest.approx(traced, rel=0.05)


@pytest.mark.parametrize("stage", ["first", "last"])
def test_pipeline_stage_estimate_agrees_with_a_1f1b_trace(stage):
    """1F1B over 4 microbatches: rank 0 keeps 2 in flight, the last 1, each backward followed by a forward with
    the gradients alive; the stages hold each in-flight microbatch's output (the first) or input (the last), the
    next input received ahead and one output gradient at a time: within 5 %."""
    setup = layout(pp=2, pp_schedule="1f1b", gradient_accumulation_steps=4)
    traced = traced_layout_peak(SPEC, setup, SPEC.layers // 2, stage)
    assert estimate_stage(SPEC, setup, stage).peak_bytes == pytest.approx(traced, rel=0.05)


@pytest.mark.parametrize("knobs, words", [
    (dict(cp=2, activation_checkpointing="selective"), "--trace of cp recomputes none or all of a layer"),
    (dict(tp=2, gpus_per_node=4), "without a data-parallel dimension"),
    (dict(tp=2, method="lora"), "full fine-tuning only"),
])
def test_what_the_layout_trace_cannot_build_is_refused_in_one_sentence(knobs, words):
    setup = TrainSetup(**{"gpus_per_node": knobs.get("tp", 1) * knobs.get("cp", 1), **knobs})
    with pytest.raises(LaunchError, match=words):
        check_traceable(setup)


def test_plan_trace_of_a_tp_pp_layout_puts_the_estimate_beside_the_trace(monkeypatch, tmp_path, capsys):
    """`llaunch plan --tp 2 --pp 2 --trace --json` on a 4-layer TinyLlama: one 4-rank tp x pp replica traced (the
    higher of its first and last stage), beside the estimate for that stage of that replica, within 5 %."""
    monkeypatch.setattr("launcher.planning.hardware.probe", lambda: Hardware(cpu_cores=2, ram_bytes=24 * 2**30))
    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo: the GPUs are the flags'
    argv = ["plan", "--model", "tinyllama-1.1b", "--model-override", "num_hidden_layers=4", "--gpu", "H100",
            "--gpus", "8", "--tp", "2", "--pp", "2", "--pp-schedule", "gpipe", "--micro-batch", "2",
            "--global-batch", "8", "--seq-len", "512", "--trace", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    trace = plan["trace"]
    assert (trace["world_size"], trace["stage"], sorted(trace["by_depth"])) == (4, "last", ["1", "2"])
    assert plan["parallel"]["tp"] == 2 and plan["parallel"]["pp"] == 2
    assert trace["estimate_bytes"] == pytest.approx(trace["peak_bytes"], rel=0.05)
    assert any("4-rank tp x pp x cp replica" in reason for reason in plan["reasons"])


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_context_parallel_estimate_agrees_with_torchs_ring_attention_traced(recompute, monkeypatch, tmp_path, capsys):
    """`llaunch plan --cp 8 --trace --json`: one 8-rank cp replica, its attention torch's own ring
    (memory_trace_ring: K and V all-gathered over cp, fp32 dQ / dK / dV), 8K of a 64K sequence per rank. The
    vocabulary is cut to 512 and every head keeps its K, V so that a layer's attention, not the loss, makes the
    peak: the estimate with the ring's buffers within 5 % of the trace."""
    monkeypatch.setattr("launcher.planning.hardware.probe", lambda: Hardware(cpu_cores=2, ram_bytes=24 * 2**30))
    monkeypatch.setenv("PATH", str(tmp_path))
    argv = ["plan", "--model", "tinyllama-1.1b", "--model-override", "num_hidden_layers=2", "--model-override",
            "vocab_size=512", "--model-override", "num_key_value_heads=32", "--gpu", "H100", "--gpus", "8",
            "--cp", "8", "--seq-len", "65536", "--micro-batch", "1", "--global-batch", "1", "--precision", "bf16",
            "--activation-checkpointing", recompute, "--trace", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    trace = plan["trace"]
    assert (plan["parallel"]["cp"], trace["world_size"], trace["stage"]) == (8, 8, "first")
    assert trace["estimate_bytes"] == pytest.approx(trace["peak_bytes"], rel=0.05)
