"""Planner decisions, golden plans, and the one-sentence errors when nothing fits."""

import json
import os
from pathlib import Path

import pytest

from launcher.errors import LaunchError
from launcher.planning.hardware import Hardware
from launcher.planning.planner import PlanRequest, make_plan, rank_candidates, hardware_for
from launcher.planning.models import load_model_spec

GOLDEN = Path(__file__).parent / "golden" / "plans"
CPU_BOX = Hardware(cpu_cores=2, ram_bytes=24 * 2**30, ram_available_bytes=20 * 2**30, hostname="ci")


def test_7b_full_finetune_on_one_80gb_gpu_needs_offload():
    plan = make_plan(PlanRequest(model="7b", gpu="H100"), CPU_BOX)
    assert plan.offload != "none" and plan.strategy.startswith("zero")
    assert plan.memory["reserved_bytes"] <= plan.memory["limit_bytes"]


def test_7b_lora_on_one_80gb_gpu_fits_without_offload():
    plan = make_plan(PlanRequest(model="7b", gpu="H100", method="lora"), CPU_BOX)
    assert plan.offload == "none" and plan.strategy == "ddp" and plan.precision == "bf16"


def test_70b_on_8x80gb_needs_zero3_or_fsdp():
    plan = make_plan(PlanRequest(model="70b", gpu="H100", gpus_per_node=8), CPU_BOX)
    assert plan.strategy in ("zero3", "fsdp")


def test_qlora_is_planned_only_under_engines_that_declare_a_quantized_base():
    """FSDP2 and ZeRO-3 shard the bf16-stored 4-bit base; ZeRO-1/2 are not offered one (they keep bf16 copies)."""
    request = PlanRequest(model="70b", gpu="H100", gpus_per_node=8, method="qlora")
    candidates = rank_candidates(load_model_spec("70b"), request, hardware_for(request, CPU_BOX))
    assert {c.setup.strategy for c in candidates} == {"ddp", "fsdp", "zero3"}
    assert {c.setup.offload for c in candidates} == {"none"}


def test_405b_qlora_fits_8x80gb_with_its_4bit_base_sharded():
    """torchtune's 405B QLoRA on 8 x 80 GB: DDP would need the ~200 GiB 4-bit base on every GPU."""
    plan = make_plan(PlanRequest(model="405b", gpu="A100-80GB", gpus_per_node=8, method="qlora"), CPU_BOX)
    assert plan.strategy == "fsdp"
    spec = load_model_spec("405b")
    from launcher.planning.memory_sizes import qlora_base_bytes

    assert plan.memory["frozen_weights"] == int(qlora_base_bytes(spec) / 8)
    assert plan.memory["reserved_bytes"] <= plan.memory["limit_bytes"]


def test_ddp_is_chosen_when_it_fits_and_is_fastest():
    request = PlanRequest(model="gpt2", gpu="H100", gpus_per_node=8)
    plan = make_plan(request, CPU_BOX)
    assert plan.strategy == "ddp"
    candidates = rank_candidates(load_model_spec("gpt2"), request, hardware_for(request, CPU_BOX))
    assert max(c.tokens_per_s for c in candidates if c.fits) == pytest.approx(plan.predicted["tokens_per_s"], rel=1e-3)


def test_slow_network_makes_sharding_pay_for_its_traffic():
    """Across 16 nodes the extra all-gathers of ZeRO-3 cost more than ZeRO-1's sharded optimizer saves."""
    request = PlanRequest(model="8b", gpu="H100", gpus_per_node=8, nodes=16, micro_batch=1, activation_checkpointing=False)
    candidates = {c.setup.strategy: c for c in rank_candidates(load_model_spec("8b"), request, hardware_for(request, CPU_BOX))
                  if c.setup.parallel.pure_data_parallel}
    assert candidates["zero3"].time_terms["comm_s"] > candidates["zero1"].time_terms["comm_s"]


def test_hsdp_is_chosen_across_nodes_when_it_fits_and_its_gathers_stay_on_nvlink():
    """8B at micro-batch 2 on 4 nodes of 8 H100: FSDP's all-gathers cross the network every step; HSDP's stay in
    the node and only gradient shards cross, so it is faster, and its 1/8 shards still fit."""
    request = PlanRequest(model="8b", gpu="H100", gpus_per_node=8, nodes=4, micro_batch=2)
    plan = make_plan(request, CPU_BOX)
    assert plan.strategy == "hsdp" and plan.device_mesh == (4, 8)
    assert any(r.startswith("hsdp shards over the 8 GPUs of a node") and "for fsdp" in r for r in plan.reasons)
    by = {c.setup.strategy: c for c in rank_candidates(load_model_spec("8b"), request, hardware_for(request, CPU_BOX))
          if c.setup.parallel.pure_data_parallel}
    assert by["hsdp"].time_terms["comm_s"] < by["fsdp"].time_terms["comm_s"] / 3
    assert by["fsdp"].memory.reserved_bytes < by["hsdp"].memory.reserved_bytes  # what HSDP pays for it


def test_hsdp_is_not_weighed_on_one_node():
    request = PlanRequest(model="8b", gpu="H100", gpus_per_node=8, micro_batch=2)
    candidates = rank_candidates(load_model_spec("8b"), request, hardware_for(request, CPU_BOX))
    assert "fsdp" in {c.setup.strategy for c in candidates}
    assert "hsdp" not in {c.setup.strategy for c in candidates}


def test_global_batch_sets_gradient_accumulation():
    plan = make_plan(PlanRequest(model="1.1b", gpu="H100", gpus_per_node=4, global_batch=64), CPU_BOX)
    assert plan.micro_batch * plan.gradient_accumulation_steps * 4 == 64
    tokens = make_plan(PlanRequest(model="1.1b", gpu="H100", gpus_per_node=4, global_batch_tokens=131072), CPU_BOX)
    assert tokens.global_batch_tokens == 131072


def test_forced_accumulation_is_planned_with_gradients_alive_in_forward():
    base = dict(model="1.1b", gpu="H100", micro_batch=4, activation_checkpointing=False)
    once = make_plan(PlanRequest(**base), CPU_BOX)
    accum = make_plan(PlanRequest(**base, gradient_accumulation_steps=8), CPU_BOX)
    assert accum.gradient_accumulation_steps == 8 and accum.global_batch == 32
    assert accum.memory["peak_bytes"] == once.memory["peak_bytes"] + once.memory["grads"]
    with pytest.raises(LaunchError, match="cannot be split"):  # 32 sequences are not 4 x 3 on one GPU
        make_plan(PlanRequest(**base, gradient_accumulation_steps=3, global_batch=32), CPU_BOX)


def test_cpu_machine_gets_a_cpu_plan_for_the_quickstart():
    plan = make_plan(PlanRequest(model="gpt2", model_overrides={"n_layer": 2}, gpus_per_node=2, seq_len=64), CPU_BOX)
    assert (plan.device, plan.gpus_per_node, plan.strategy, plan.precision) == ("cpu", 2, "ddp", "fp32")
    assert plan.params == load_model_spec("gpt2", {"n_layer": 2}).num_params
    assert plan.memory["limit_bytes"] == int(20 * 2**30 * 0.95 / 2)


def test_impossible_plan_names_the_smallest_change():
    with pytest.raises(LaunchError, match=r"does not fit.*--gpus 2|does not fit.*--nodes|does not fit.*lora"):
        make_plan(PlanRequest(model="70b", gpu="H100", strategy="fsdp", offload="none"), CPU_BOX)
    with pytest.raises(LaunchError, match="does not fit"):
        make_plan(PlanRequest(model="405b", gpu="L40S", gpus_per_node=1, method="qlora", offload="none"), CPU_BOX)


def test_forced_knobs_are_kept():
    plan = make_plan(PlanRequest(model="1.1b", gpu="H100", gpus_per_node=2, strategy="zero2", micro_batch=2,
                                 activation_checkpointing=True, precision="bf16"), CPU_BOX)
    assert (plan.strategy, plan.micro_batch, plan.activation_checkpointing, plan.precision) == ("zero2", 2, "full", "bf16")


def test_bad_requests_are_one_sentence():
    with pytest.raises(LaunchError, match="--gpus-per-node must be a positive integer"):
        make_plan(PlanRequest(model="7b", gpus_per_node=0), CPU_BOX)
    with pytest.raises(LaunchError, match="unknown GPU"):
        make_plan(PlanRequest(model="7b", gpu="GTX 9999"), CPU_BOX)


@pytest.mark.parametrize("name, request_kwargs", [
    ("llama-3.1-8b-8xh100", dict(model="8b", gpu="H100", gpus_per_node=8)),
    ("tinyllama-1xh100", dict(model="tinyllama-1.1b", gpu="H100")),
    ("llama-2-7b-lora-1xa100", dict(model="7b", gpu="A100-80GB", method="lora", lora_r=8)),
    ("gpt2-cpu-2proc", dict(model="gpt2", gpus_per_node=2, seq_len=128)),
])
def test_golden_plans(name, request_kwargs):
    """Regenerate after a deliberate estimator change with LLAUNCH_UPDATE_GOLDEN=1 and review the diff."""
    plan = make_plan(PlanRequest(**request_kwargs), CPU_BOX).to_dict()
    path = GOLDEN / f"{name}.json"
    if os.environ.get("LLAUNCH_UPDATE_GOLDEN"):
        path.write_text(json.dumps(plan, indent=1, sort_keys=True) + "\n")
    assert plan == json.loads(path.read_text())


def test_70b_qlora_fits_two_24gb_cards_with_fsdp_cpu_offload():
    """Answer.AI's FSDP + QLoRA: the 4-bit 70B base (~36 GB) sharded over 2 x 24 GB, the shards in host memory."""
    plan = make_plan(PlanRequest(model="70b", method="qlora", gpus_per_node=2, gpu_mem_bytes=24 * 2**30), CPU_BOX)
    assert (plan.strategy, plan.offload) == ("fsdp", "optimizer+params")
    assert plan.memory["frozen_weights"] == 0 and plan.memory["host_offload_bytes"] > 0
    assert plan.memory["reserved_bytes"] <= plan.memory["limit_bytes"]


def test_optimizer_in_backward_is_planned_for_one_process_only():
    request = PlanRequest(model="1.1b", gpu="H100", optimizer_in_backward=True, global_batch=8)
    plan = make_plan(request, CPU_BOX)
    assert plan.optimizer_in_backward and plan.strategy == "ddp" and plan.gradient_accumulation_steps == 1
    assert plan.memory["grads"] < make_plan(PlanRequest(model="1.1b", gpu="H100", global_batch=8), CPU_BOX).memory["grads"]
    with pytest.raises(LaunchError, match="optimizer_in_backward steps each weight"):
        make_plan(PlanRequest(model="1.1b", gpu="H100", gpus_per_node=2, optimizer_in_backward=True), CPU_BOX)


def test_8b_full_finetune_fits_one_24gb_card_with_paged_8bit_states_stepped_in_backward():
    """torchtune's single-device recipe: bf16 weights, PagedAdamW8bit, optimizer_in_bwd. The paged states live
    in CUDA unified memory: the GPU holds the stepped tensor's, host RAM the rest (paged in over PCIe)."""
    card = dict(model="8b", gpus_per_node=1, gpu_mem_bytes=24 * 2**30, strategy="ddp", precision="bf16",
                optimizer_in_backward=True)
    plan = make_plan(PlanRequest(**card, optimizer="paged_adamw_8bit"), CPU_BOX)
    assert (plan.strategy, plan.offload, plan.optimizer_in_backward) == ("ddp", "none", True)
    assert plan.memory["reserved_bytes"] <= plan.memory["limit_bytes"]
    assert plan.memory["paged_bytes"] == 2 * plan.params  # 8-bit m and v for every weight
    assert plan.memory["optimizer"] < 1.1 * 2**30  # on the GPU: the embedding's states, the largest tensor
    assert any("of optimizer state in host RAM" in reason for reason in plan.reasons)
    with pytest.raises(LaunchError, match="does not fit"):  # the same 8-bit states, not paged, stay on the GPU
        make_plan(PlanRequest(**card, optimizer="adamw_bnb_8bit"), CPU_BOX)


def test_a_full_finetune_too_big_for_one_card_is_told_the_single_gpu_recipe():
    with pytest.raises(LaunchError, match=r"--precision bf16 --optimizer paged_adamw_8bit --optimizer-in-backward\)\.$"):
        make_plan(PlanRequest(model="8b", gpus_per_node=1, gpu_mem_bytes=24 * 2**30, strategy="ddp"), CPU_BOX)
