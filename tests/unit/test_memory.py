"""Estimator terms, and the papers' published figures reproduced exactly."""

import pytest

from launcher.planning.memory import estimate
from launcher.planning.memory_sizes import layer_activation_bytes, qlora_base_bytes
from launcher.planning.plan import TrainSetup
from launcher.planning.models import load_model_spec

GB = 1e9


def model_states(breakdown):
    return sum(breakdown[n] for n in ("weights", "grads", "optimizer"))


@pytest.mark.parametrize("strategy, expected_gb", [("ddp", 120.0), ("zero1", 31.4), ("zero2", 16.6), ("zero3", 1.9)])
def test_zero_paper_figure_1_model_states_for_7_5b_on_64_gpus(strategy, expected_gb):
    """ZeRO (Rajbhandari et al. 2020), Figure 1: Psi = 7.5B, N_d = 64, K = 12 -> 120, 31.4, 16.6, 1.9 GB."""
    spec = load_model_spec("7b")
    spec.num_params = 7_500_000_000  # the paper's Psi; layout is irrelevant to model states
    precision = "amp-bf16"
    b = estimate(spec, TrainSetup(strategy=strategy, precision=precision, gpus_per_node=64))
    assert model_states(b) / GB == pytest.approx(expected_gb, abs=0.06)


def test_qlora_paper_65b_fits_one_48gb_gpu_but_16bit_lora_does_not():
    """QLoRA (Dettmers et al. 2023), abstract: a 65B model fine-tunes on a single 48GB GPU; 16-bit LoRA cannot.

    Paper setup: NF4 + double quantization, bf16 compute, checkpointing, sequences of 512. We keep fp32 adapters
    and Adam states (PEFT's default, the paper pages them to CPU), so r=16 rather than the paper's 64.
    """
    spec = load_model_spec("65b")
    setup = dict(seq_len=512, micro_batch=1, activation_checkpointing=True, lora_r=16, precision="bf16")
    qlora = estimate(spec, TrainSetup(method="qlora", **setup))
    lora = estimate(spec, TrainSetup(method="lora", **setup))
    assert qlora.reserved_bytes < 48 * GB < lora.reserved_bytes
    assert qlora["frozen_weights"] / GB == pytest.approx(33.7 + 1.05, abs=0.5)  # ~4.13 bits/param + bf16 embeddings
    assert lora["frozen_weights"] == 2 * spec.num_params


def test_precision_semantics_amp_keeps_fp32_weights_bf16_keeps_everything_bf16():
    spec = load_model_spec("tinyllama-1.1b")
    amp = estimate(spec, TrainSetup(precision="amp-bf16"))
    bf16 = estimate(spec, TrainSetup(precision="bf16"))
    P = spec.num_params
    assert (amp["weights"], amp["grads"], amp["optimizer"]) == (4 * P, 4 * P, 8 * P)
    assert (bf16["weights"], bf16["grads"], bf16["optimizer"]) == (2 * P, 2 * P, 4 * P)
    assert amp["weight_copies"] == 2 * spec.linear_params and bf16["weight_copies"] == 0


def test_lora_counts_frozen_base_apart_from_trainable_adapters():
    spec = load_model_spec("7b")
    b = estimate(spec, TrainSetup(method="lora", precision="bf16", lora_r=16))
    adapters = spec.lora_params(16, ["all-linear"])
    assert b.trainable_params == adapters and b.frozen_params == spec.num_params
    assert b["frozen_weights"] == 2 * spec.num_params
    assert (b["weights"], b["grads"], b["optimizer"]) == (4 * adapters, 4 * adapters, 8 * adapters)


def test_sharding_divides_exactly_the_states_each_strategy_shards():
    spec = load_model_spec("8b")
    P = spec.num_params
    ddp, fsdp = (estimate(spec, TrainSetup(strategy=s, gpus_per_node=8)) for s in ("ddp", "fsdp"))
    assert fsdp["weights"] == ddp["weights"] // 8 and fsdp["grads"] == ddp["grads"] // 8
    assert fsdp["optimizer"] == 8 * P // 8
    z2 = estimate(spec, TrainSetup(strategy="zero2", gpus_per_node=8))
    assert z2["weights"] == 2 * P and z2["grads"] == 2 * P // 8 and z2["optimizer"] == 12 * P // 8


def test_hsdp_on_nodes_of_8_holds_the_model_states_fsdp_holds_on_8():
    """HSDP shards within a node and replicates across nodes: 4 nodes x 8 GPUs hold what FSDP on 8 does, per rank."""
    spec = load_model_spec("8b")
    hsdp = estimate(spec, TrainSetup(strategy="hsdp", gpus_per_node=8, nodes=4))
    fsdp8, fsdp32 = (estimate(spec, TrainSetup(strategy="fsdp", gpus_per_node=w)) for w in (8, 32))
    for state in ("weights", "grads", "optimizer", "comm_buffers", "optimizer_scratch"):
        assert hsdp[state] == fsdp8[state], state
    assert hsdp.peak_bytes == fsdp8.peak_bytes and hsdp["weights"] == 4 * fsdp32["weights"]


def test_offload_moves_optimizer_and_then_weights_to_host_ram():
    spec = load_model_spec("7b")
    z2 = estimate(spec, TrainSetup(strategy="zero2", gpus_per_node=1))
    off = estimate(spec, TrainSetup(strategy="zero2", offload="optimizer", gpus_per_node=1))
    inf = estimate(spec, TrainSetup(strategy="zero3", offload="optimizer+params", gpus_per_node=1))
    assert off["optimizer"] == 0 and off.peak_bytes < z2.peak_bytes and off.host_offload_bytes == 16 * spec.num_params
    assert inf["weights"] == 0 and inf.host_offload_bytes == 18 * spec.num_params


def test_activations_scale_with_tokens_and_checkpointing_keeps_only_layer_inputs():
    spec = load_model_spec("tinyllama-1.1b")
    one, four = (estimate(spec, TrainSetup(micro_batch=m)) for m in (1, 4))
    assert four["activations"] == 4 * one["activations"]
    ckpt = estimate(spec, TrainSetup(micro_batch=4, activation_checkpointing=True))
    assert ckpt["activations"] == spec.layers * 4 * 2048 * spec.hidden * 4  # fp32 residual under autocast
    assert ckpt.peak_bytes < four.peak_bytes


def test_layer_activations_of_the_hf_llama_block():
    """Norms + linear inputs + attention + MLP, per token: amp 30h + 4kv + 8f, bf16 20h + 4kv + 8f (H100-confirmed)."""
    spec = load_model_spec("tinyllama-1.1b")
    h, f, kv = spec.hidden, spec.ffn, spec.kv_heads * spec.head_dim
    assert layer_activation_bytes(spec, TrainSetup(precision="amp-bf16")) == 16 * h + 10 * h + 4 * h + 4 * kv + 8 * f
    assert layer_activation_bytes(spec, TrainSetup(precision="bf16")) == 12 * h + 4 * h + 4 * h + 4 * kv + 8 * f
    eager = layer_activation_bytes(spec, TrainSetup(precision="bf16", attention="eager", seq_len=1024))
    assert eager - layer_activation_bytes(spec, TrainSetup(precision="bf16", seq_len=1024)) == spec.heads * 1024 * 6


def test_logits_term_is_tokens_times_vocab_times_twelve_bytes():
    spec = load_model_spec("8b")
    b = estimate(spec, TrainSetup(micro_batch=2, seq_len=4096, loss_chunk_tokens=0))
    assert b["logits_loss"] == 2 * 4096 * 128256 * 12


def test_chunked_loss_keeps_one_chunk_of_logits_where_the_engine_runs_it():
    """The issue's Llama-3 case (2 x 2048 tokens, 128k vocab): ~5.9 GiB of logits becomes one 512-token chunk
    (+ the fp32 LM head gradient a full fine-tune accumulates over the chunks); ZeRO-3 keeps the full logits."""
    spec = load_model_spec("8b")
    full = estimate(spec, TrainSetup(micro_batch=2, seq_len=2048, loss_chunk_tokens=0))
    chunked = estimate(spec, TrainSetup(micro_batch=2, seq_len=2048))
    lora = estimate(spec, TrainSetup(micro_batch=2, seq_len=2048, method="lora"))
    assert full["logits_loss"] == 2 * 2048 * 128256 * 12
    assert lora["logits_loss"] == 512 * 128256 * 12
    assert chunked["logits_loss"] == 512 * 128256 * 12 + 128256 * 4096 * 4
    assert chunked.peak_bytes < full.peak_bytes
    zero3 = TrainSetup(strategy="zero3", gpus_per_node=8, micro_batch=2, seq_len=2048)
    assert estimate(spec, zero3)["logits_loss"] == full["logits_loss"]


def test_peak_is_the_largest_phase_over_persistent_state():
    spec = load_model_spec("tinyllama-1.1b")
    b = estimate(spec, TrainSetup(micro_batch=1, optimizer="adamw_torch"))
    assert b.peak_phase == "optimizer_step"  # foreach AdamW's sqrt(v) scratch beats one sequence of activations
    assert b.peak_bytes == b["weights"] + b["optimizer"] + b["grads"] + b["optimizer_scratch"]
    big = estimate(spec, TrainSetup(micro_batch=8))
    assert big.peak_phase == "forward" and big.reserved_bytes > big.peak_bytes


def test_gradient_accumulation_keeps_gradients_alive_through_the_next_forward():
    spec = load_model_spec("tinyllama-1.1b")
    once = estimate(spec, TrainSetup(micro_batch=8))
    accum = estimate(spec, TrainSetup(micro_batch=8, gradient_accumulation_steps=4))
    assert accum.peak_bytes - once.peak_bytes == once["grads"]


def test_optimizer_choice_changes_state_bytes():
    spec = load_model_spec("tinyllama-1.1b")
    P = spec.num_params
    assert estimate(spec, TrainSetup(optimizer="adamw_bnb_8bit"))["optimizer"] == 2 * P
    paged = estimate(spec, TrainSetup(optimizer="paged_adamw_8bit"))
    # The same 2 B/param, in CUDA unified memory: only the largest tensor's (the 32000 x 2048 embedding) must
    # stay on the GPU; on CPU nothing is paged.
    assert paged.paged_bytes == 2 * P and paged["optimizer"] == 2 * 32000 * 2048
    on_cpu = estimate(spec, TrainSetup(optimizer="paged_adamw_8bit", device="cpu"))
    assert (on_cpu.paged_bytes, on_cpu["optimizer"]) == (0, 2 * P)
    assert estimate(spec, TrainSetup(optimizer="sgd"))["optimizer"] == 4 * P
    assert estimate(spec, TrainSetup(optimizer="adamw_torch"))["optimizer"] == 8 * P


def test_step_scratch_follows_the_optimizer_the_run_builds():
    """The default fused AdamW updates in place; foreach AdamW materialises sqrt(v); foreach SGD copies the grads."""
    spec = load_model_spec("tinyllama-1.1b")
    P = spec.num_params
    scratch = {name: estimate(spec, TrainSetup(optimizer=name))["optimizer_scratch"]
               for name in ("adamw_torch_fused", "adamw_torch", "adamw_bnb_8bit", "sgd")}
    assert scratch == {"adamw_torch_fused": 0, "adamw_torch": 4 * P, "adamw_bnb_8bit": 0, "sgd": 4 * P}
    assert TrainSetup().optimizer == "adamw_torch_fused"  # the config's default training.optim
    zero2 = estimate(spec, TrainSetup(strategy="zero2", gpus_per_node=8, optimizer="adamw_torch"))
    assert zero2["optimizer_scratch"] == 4 * P // 8  # DeepSpeed steps fp32 partitions


def test_adafactor_factors_its_state_except_on_deepspeed_partitions():
    spec = load_model_spec("8b")
    P = spec.num_params
    ddp = estimate(spec, TrainSetup(optimizer="adafactor"))
    assert 0 < ddp["optimizer"] < 0.001 * 4 * P  # rows + columns: ~1M elements for 8B parameters
    # per parameter in fp32: grad^2 and the update, twice the embedding at its largest
    assert ddp["optimizer_scratch"] == spec.vocab * spec.hidden * 4 * 2
    fsdp = estimate(spec, TrainSetup(optimizer="adafactor", strategy="fsdp", gpus_per_node=8))
    assert fsdp["optimizer_scratch"] == ddp["optimizer_scratch"] // 8
    zero2 = estimate(spec, TrainSetup(optimizer="adafactor", strategy="zero2", gpus_per_node=8))
    assert zero2["optimizer"] == (4 + 4) * P // 8  # a full fp32 v on the flat partition + the master copy
    lora = estimate(spec, TrainSetup(optimizer="adafactor", method="lora"))
    assert 0 < lora["optimizer"] < 0.1 * lora.trainable_params * 4  # (r + in) + (out + r) of r x (in + out)


@pytest.mark.parametrize("setup", [
    TrainSetup(strategy="ddp", gradient_accumulation_steps=4, gpus_per_node=8),
    TrainSetup(strategy="fsdp", activation_checkpointing=True, gpus_per_node=64, micro_batch=4),
    TrainSetup(strategy="zero3", offload="optimizer+params", method="lora", gpus_per_node=16),
    TrainSetup(strategy="ddp", method="qlora", precision="bf16", micro_batch=8),
])
def test_what_is_alive_at_the_peak_adds_up_to_the_reserved_bytes(setup):
    """The --plot bars stack `at_peak`: it must be the peak phase's terms on top of the persistent ones, exactly."""
    b = estimate(load_model_spec("8b"), setup)
    assert sum(b.at_peak.values()) == b.reserved_bytes
    assert b.at_peak["context_reserve"] == b["context_reserve"] and b.at_peak["optimizer"] == b["optimizer"]


def test_fsdp_cpu_offload_moves_the_model_states_to_host_memory():
    """FSDP2 CPUOffloadPolicy: weights, gradients and AdamW states of each shard in host RAM (16 B/param / ranks)."""
    spec = load_model_spec("8b")
    on_gpu = estimate(spec, TrainSetup(strategy="fsdp", gpus_per_node=8, activation_checkpointing=True))
    offloaded = estimate(spec, TrainSetup(strategy="fsdp", gpus_per_node=8, activation_checkpointing=True,
                                          offload="optimizer+params"))
    assert on_gpu["weights"] > 0 and on_gpu["optimizer"] > 0 and on_gpu.host_offload_bytes == 0
    assert offloaded["weights"] == offloaded["grads"] == offloaded["optimizer"] == 0
    assert offloaded.host_offload_bytes == spec.num_params * 16 // 8
    assert offloaded["comm_buffers"] == on_gpu["comm_buffers"]  # layers are still gathered on the GPU
    qlora = estimate(spec, TrainSetup(strategy="fsdp", gpus_per_node=2, method="qlora", offload="optimizer+params"))
    assert qlora["frozen_weights"] == 0 and qlora.host_offload_bytes > qlora_base_bytes(spec) / 2


def test_optimizer_in_backward_keeps_one_gradient_not_all():
    spec = load_model_spec("8b")
    after = estimate(spec, TrainSetup(precision="bf16", activation_checkpointing=True))
    during = estimate(spec, TrainSetup(precision="bf16", activation_checkpointing=True, optimizer_in_backward=True))
    assert after["grads"] == spec.num_params * 2
    assert during["grads"] == spec.vocab * spec.hidden * 2  # the largest weight: an embedding matrix
    assert after.peak_bytes - during.peak_bytes >= after["grads"] - during["grads"] - spec.vocab * spec.hidden * 4


def test_qlora_base_is_sharded_under_fsdp():
    spec = load_model_spec("70b")
    ddp = estimate(spec, TrainSetup(method="qlora", precision="bf16"))
    fsdp = estimate(spec, TrainSetup(strategy="fsdp", gpus_per_node=4, method="qlora", precision="bf16"))
    assert ddp["frozen_weights"] == int(qlora_base_bytes(spec))
    assert fsdp["frozen_weights"] == int(qlora_base_bytes(spec) / 4)
