"""The analytic estimator held against PyTorch's MemTracker tracing a real step on fake tensors (CPU kernels)."""

import pytest

from launcher.errors import LaunchError
from launcher.memory import TrainSetup, estimate
from launcher.memory_trace import trace_peak, traced_step_peak
from launcher.models import load_model_spec

SMALL_LLAMA = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 2000}


@pytest.mark.parametrize("knobs", [
    dict(precision="fp32"),
    dict(precision="bf16"),
    dict(precision="amp-bf16"),
    dict(precision="fp32", activation_checkpointing=True, micro_batch=4),
])
def test_estimate_agrees_with_a_memtracker_trace(knobs):
    """CPU kernels save slightly different tensors than CUDA's (the estimator is calibrated on an H100), so 12%."""
    spec = load_model_spec("tinyllama-1.1b", SMALL_LLAMA)
    setup = TrainSetup(**{"micro_batch": 2, "seq_len": 512, "device": "cpu", **knobs})
    traced = traced_step_peak(spec, setup, spec.layers)
    assert estimate(spec, setup).peak_bytes == pytest.approx(traced, rel=0.12)


def test_trace_of_a_truncated_model_scales_exactly_by_depth():
    spec = load_model_spec("tinyllama-1.1b", SMALL_LLAMA)
    setup = TrainSetup(micro_batch=1, seq_len=256, precision="fp32", device="cpu")
    scaled = trace_peak(spec, setup)
    assert sorted(scaled.by_depth) == [1, 2]
    assert scaled.peak_bytes == pytest.approx(traced_step_peak(spec, setup, 4), rel=0.01)


def test_trace_refuses_adapters_in_one_sentence():
    with pytest.raises(LaunchError, match="full fine-tuning only"):
        traced_step_peak(load_model_spec("gpt2"), TrainSetup(method="lora"), 1)
