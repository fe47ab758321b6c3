"""A mixture of experts' memory terms held against `llaunch plan --trace`: MemTracker tracing a real step of the
HF model (transformers 5's grouped-GEMM experts) on fake tensors, every width as published, cut to 1 and 2
decoder layers (launcher/planning/memory_trace.py)."""

import json

import pytest

from launcher.cli import main
from launcher.planning.hardware import Hardware
from launcher.planning.memory import MODEL_STATES, estimate
from launcher.planning.models import load_model_spec
from launcher.planning.plan import TrainSetup

# Mixtral: 8 experts of width 14336, top-2, no shared expert; Qwen3-30B-A3B: 128 of width 768, top-8, q/k norms.
TRACED = ("mixtral-8x7b", "qwen3-30b-a3b")
MICRO_BATCH = 4  # of 4,096 tokens: saved activations are 40-45 % of what a layer adds


@pytest.mark.parametrize("model", TRACED)
def test_an_moe_layer_adds_what_the_estimate_adds_on_fake_tensors(model, monkeypatch, tmp_path, capsys):
    """One rank, bf16: the whole peak within 5 %, what the second (MoE) layer adds within 5 %, and of that, the
    saved activations alone (the router, the dropless dispatch and combine rows, the experts' SwiGLU tensors and
    the routing indices of expert_parallel.moe_bytes_per_token) within 5 % of the traced increment less the
    layer's weights, gradients and AdamW states."""
    monkeypatch.setattr("launcher.planning.hardware.probe", lambda: Hardware(cpu_cores=2, ram_bytes=24 * 2**30))
    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo: the GPU is the flags'
    micro = MICRO_BATCH
    argv = ["plan", "--model", model, "--model-override", "num_hidden_layers=2", "--gpu", "H100", "--gpus", "1",
            "--precision", "bf16", "--strategy", "ddp", "--micro-batch", str(micro), "--global-batch", str(micro),
            "--seq-len", "4096", "--loss-chunk-tokens", "0", "--trace", "--json"]
    assert main(argv) == 0
    trace = json.loads(capsys.readouterr().out)["trace"]
    # The whole logits at the end of the forward make it the peak at 1 and 2 layers alike (not one layer's backward).
    setup = TrainSetup(micro_batch=micro, seq_len=4096, precision="bf16", loss_chunk_tokens=0)
    one, two = (estimate(load_model_spec(model, {"num_hidden_layers": depth}), setup) for depth in (1, 2))
    assert (one.peak_phase, two.peak_phase, two.peak_bytes) == ("forward", "forward", trace["estimate_bytes"])
    assert two.peak_bytes == pytest.approx(trace["peak_bytes"], rel=0.05)
    traced_layer = trace["by_depth"]["2"] - trace["by_depth"]["1"]
    assert two.peak_bytes - one.peak_bytes == pytest.approx(traced_layer, rel=0.05)
    states = sum(two[name] - one[name] for name in MODEL_STATES if name != "frozen_weights")
    assert two["activations"] - one["activations"] == pytest.approx(traced_layer - states, rel=0.05)


@pytest.mark.parametrize("model, ep", [("mixtral-8x7b", 8), ("qwen3-30b-a3b", 4)])
def test_experts_split_over_ep_hold_what_the_estimate_says_on_fake_tensors(model, ep, monkeypatch, tmp_path, capsys):
    """FSDP at 8 ranks with the experts over ep (whole on each rank at ep 8; FSDP-sharded over 2 at ep 4), traced with the ranks' own expert parallelism
    (launcher.train.expert_parallel: the dispatch, the all-to-alls, the grouped GEMMs) routed evenly: the whole
    peak within 5 % (the experts' FSDP unit gathers only the rank's experts; ep alone leaves the loss as it is),
    and what an MoE layer adds, its saved activations alone, within 2 % (the dispatch keeps what transformers'
    experts keep: no copy of the experts' output)."""
    monkeypatch.setattr("launcher.planning.hardware.probe", lambda: Hardware(cpu_cores=2, ram_bytes=24 * 2**30))
    monkeypatch.setenv("PATH", str(tmp_path))
    micro = MICRO_BATCH
    argv = ["plan", "--model", model, "--model-override", "num_hidden_layers=2", "--gpu", "H100", "--gpus", "8",
            "--precision", "bf16", "--strategy", "fsdp", "--ep", str(ep), "--activation-checkpointing", "none",
            "--micro-batch", str(micro), "--global-batch", str(8 * micro), "--seq-len", "4096",
            "--loss-chunk-tokens", "0", "--trace", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    trace = plan["trace"]
    assert (plan["parallel"]["ep"], trace["world_size"], trace["strategy"]) == (ep, 8, "fsdp")
    setup = TrainSetup(micro_batch=micro, seq_len=4096, precision="bf16", loss_chunk_tokens=0, strategy="fsdp",
                       gpus_per_node=8, ep=ep, activation_checkpointing="none")
    one, two = (estimate(load_model_spec(model, {"num_hidden_layers": depth}), setup) for depth in (1, 2))
    assert two.peak_bytes == trace["estimate_bytes"] == pytest.approx(trace["peak_bytes"], rel=0.05)
    traced_layer = trace["by_depth"]["2"] - trace["by_depth"]["1"]
    states = sum(two[name] - one[name] for name in MODEL_STATES if name != "frozen_weights")
    assert two["activations"] - one["activations"] == pytest.approx(traced_layer - states, rel=0.02)


@pytest.mark.parametrize("model", TRACED)
def test_under_the_chunked_loss_the_experts_backward_is_the_peak_the_estimate_counts(model, monkeypatch, tmp_path,
                                                                                     capsys):
    """The default chunked loss leaves no whole logits: the step's peak is the last MoE layer's experts backward,
    its gradients beside every saved activation (expert_parallel.moe_layer_gradient_bytes_per_token). 2 layers,
    16 K tokens, one rank: the estimate within 5 % of the trace."""
    monkeypatch.setattr("launcher.planning.hardware.probe", lambda: Hardware(cpu_cores=2, ram_bytes=24 * 2**30))
    monkeypatch.setenv("PATH", str(tmp_path))
    argv = ["plan", "--model", model, "--model-override", "num_hidden_layers=2", "--gpu", "H100", "--gpus", "1",
            "--precision", "bf16", "--strategy", "ddp", "--micro-batch", "8", "--global-batch", "8",
            "--seq-len", "2048", "--loss-chunk-tokens", "512", "--activation-checkpointing", "none", "--trace", "--json"]
    assert main(argv) == 0
    trace = json.loads(capsys.readouterr().out)["trace"]
    assert trace["estimate_bytes"] == pytest.approx(trace["peak_bytes"], rel=0.05)
