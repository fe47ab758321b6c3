"""Expert parallelism in the planner (launcher/planning/expert_parallel.py): each term against a hand count from the
shapes, and `llaunch plan` as a user runs it for DeepSeek-V3 (searched, and its published layout forced)."""

import dataclasses
import json

import pytest

from launcher.cli import main
from launcher.planning import expert_parallel as ep
from launcher.planning import memory_layout as mem
from launcher.planning.hardware import Hardware
from launcher.planning.memory import estimate
from launcher.planning.memory_sizes import ComputeMode
from launcher.planning.models import load_model_spec
from launcher.planning.plan import TrainSetup
from launcher.planning.planner import PlanRequest, hardware_for
from launcher.planning.step_time import LINK_EFFICIENCY, expert_all_to_all_seconds

DSV3 = load_model_spec("deepseek-v3")  # 61 layers, 58 of them MoE: 256 routed experts of width 2048, top-8, hidden 7168
DEEPSEEK_LAYOUT = dict(strategy="zero1", precision="bf16", nodes=256, gpus_per_node=8, pp=16, seq_len=4096,
                       micro_batch=1, gradient_accumulation_steps=120, activation_checkpointing="full")


def test_ep_splits_only_the_routed_experts_states():
    """ZeRO-1 replicates weights and grads: ep 2 halves their routed-expert part (58 layers x 256 x 3 x 7168 x 2048
    weights) and leaves the rest; the optimizer states are split over the whole data-parallel group either way."""
    one = estimate(DSV3, TrainSetup(**DEEPSEEK_LAYOUT, ep=1))
    two = estimate(DSV3, TrainSetup(**DEEPSEEK_LAYOUT, ep=2))
    # bf16 weights on the most loaded first-stage rank: 4 of the 61 layers (torchtitan's split: 3, 4 x 14, 2)
    routed_per_stage = 58 * 256 * 3 * 7168 * 2048 * 2 * 4 / 61
    assert one["weights"] - two["weights"] == pytest.approx(routed_per_stage / 2, rel=0.02)
    assert one["grads"] - two["grads"] == pytest.approx(routed_per_stage / 2, rel=0.02)
    assert two["optimizer"] == one["optimizer"]


def test_moe_activations_add_router_and_dispatch_combine_buffers():
    """Per MoE layer and token in bf16: 256 fp32 logits, 8 fp32 scores + 8 int64 indices (the shared expert keeps
    the router's input), and for each of the 8 routed copies the dispatched and combined 7168-wide rows, the
    2048-wide gate_up output (2x), silu(gate) and product, and 28 B of routing indices and weight; the 3 dense
    layers' MLP is 8 x 2048 wider than the shared expert. Over the 61 layers; against the same model counted
    dense, the routed experts' SwiGLU that the dense rule counted at the MLP width (2 B x 4 x 8 x 2048) moves here."""
    per_moe_layer = 256 * 4 + 8 * (4 + 8) + 8 * (2 * (2 * 7168 + 4 * 2048) + 28)
    dense_gap = 3 * 2 * 4 * (18432 - 2048)
    assert ep.moe_bytes_per_token(DSV3, ComputeMode.HALF) == pytest.approx((58 * per_moe_layer + dense_gap) / 61)
    assert ep.moe_bytes_per_token(load_model_spec("8b"), ComputeMode.HALF) == 0
    setup = TrainSetup(**{**DEEPSEEK_LAYOUT, "activation_checkpointing": "none"})
    dense = dataclasses.replace(DSV3, moe=None)
    assert (mem.layer_bytes_per_token(DSV3, setup) - mem.layer_bytes_per_token(dense, setup)
            == pytest.approx((58 * per_moe_layer + dense_gap) / 61 - 2 * 4 * 8 * 2048))


def test_all_to_all_is_zero_at_ep_1_and_crosses_the_network_beyond_a_node():
    """4 all-to-alls per MoE layer and microbatch (dispatch + combine, forward and backward), each of
    tokens x 8 x 7168 x 2 B, (ep - 1) / ep of it leaving the rank; ep 64 spans 8 nodes: the network."""
    hw = hardware_for(PlanRequest(gpu="H800", gpus_per_node=8, nodes=256), Hardware())
    none = TrainSetup(**{**DEEPSEEK_LAYOUT, "activation_checkpointing": "none"})
    assert expert_all_to_all_seconds(DSV3, none, hw, hw.facts) == 0
    wide = dataclasses.replace(none, ep=64)
    size = 4096 * 8 * 7168 * 2 * 63 / 64
    expected = 58 / 16 * 120 * 4 * size / (hw.network_bytes_per_s * LINK_EFFICIENCY)
    assert expert_all_to_all_seconds(DSV3, wide, hw, hw.facts) == pytest.approx(expected)
    full = dataclasses.replace(wide, activation_checkpointing="full")
    assert expert_all_to_all_seconds(DSV3, full, hw, hw.facts) == pytest.approx(expected * 6 / 4)
    inside = dataclasses.replace(wide, ep=8)  # one node's 8 GPUs: NVLink
    nvlink = hw.facts.nvlink_bytes_per_s * LINK_EFFICIENCY
    on_nvlink = 58 / 16 * 120 * 4 * (4096 * 8 * 7168 * 2 * 7 / 8) / nvlink
    assert expert_all_to_all_seconds(DSV3, inside, hw, hw.facts) == pytest.approx(on_nvlink)


def _plan(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_deepseek_v3_published_layout_forced_fits_the_80gb_h800(capsys):
    """PP16 x EP64 x ZeRO-1 on 2,048 H800, sequence 4,096 (arXiv 2412.19437): the plan carries ep and fits."""
    plan = _plan(capsys, "--model", "deepseek-v3", "--gpus", "8", "--nodes", "256", "--gpu", "H800", "--tp", "1",
                 "--pp", "16", "--ep", "64", "--strategy", "zero1", "--seq-len", "4096", "--global-batch", "15360",
                 "--micro-batch", "1", "--activation-checkpointing", "full")
    assert plan["parallel"]["ep"] == 64 and plan["parallel"]["pp"] == 16 and plan["parallel"]["tp"] == 1
    assert plan["memory"]["reserved_bytes"] <= plan["memory"]["limit_bytes"]
    assert plan["memory"]["reserved_bytes"] < 80 * 2**30  # the H800's 80 GB (GiB) of HBM3
    assert any("ep 64 holds 1/64 of the routed experts" in reason for reason in plan["reasons"])


def test_deepseek_v3_on_2048_gpus_is_planned_with_expert_parallelism(capsys):
    plan = _plan(capsys, "--model", "deepseek-v3", "--gpus", "8", "--nodes", "256")
    assert plan["parallel"]["ep"] > 1
    assert any(f"ep {plan['parallel']['ep']} holds" in reason for reason in plan["reasons"])
