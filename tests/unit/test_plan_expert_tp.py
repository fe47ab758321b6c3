"""Expert tensor parallelism (etp) in the planner: the record's rule, each term it changes against a hand count,
and `llaunch plan` choosing etp = tp for big experts that do not fit whole and etp = 1 for fine-grained ones."""

import dataclasses
import json

import pytest

from launcher.cli import main
from launcher.errors import LaunchError
from launcher.planning import expert_parallel as ep
from launcher.planning import memory_layout as mem
from launcher.planning.hardware import Hardware
from launcher.planning.memory import estimate
from launcher.planning.memory_sizes import ComputeMode
from launcher.planning.models import load_model_spec
from launcher.planning.parallel import ParallelDims, check_layout
from launcher.planning.plan import Plan, TrainSetup
from launcher.planning.planner import PlanRequest, hardware_for
from launcher.planning.step_time import LINK_EFFICIENCY, expert_all_to_all_seconds

MIXTRAL = load_model_spec("mixtral-8x22b")  # 56 MoE layers of 8 experts (width 16384), top-2, hidden 6144
DSV3 = load_model_spec("deepseek-v3")  # 58 of 61 layers MoE: 256 experts of width 2048, top-8, hidden 7168
# Megatron's distributed optimizer (zero1) beside tp 8 on 64 H100: the experts' share is 96 % of the weights.
MIXTRAL_TP8 = dict(strategy="zero1", precision="bf16", nodes=8, gpus_per_node=8, tp=8, ep=8, seq_len=4096,
                   micro_batch=1, activation_checkpointing="full")


@pytest.mark.parametrize("dims, sentence", [
    (ParallelDims(dp_shard=4, tp=4, ep=2, etp=2), "--etp 2 must be 1 (whole experts on each tp rank) or tp 4"),
    (ParallelDims(dp_shard=4, tp=4, etp=4), "without ep tp splits them already, so use --etp 1 or an --ep above 1"),
    (ParallelDims(dp_shard=4, tp=4, ep=2), "choose an ep that is a multiple of 4, or --etp 4 to split the experts"),
    (ParallelDims(dp_shard=2, tp=8, ep=4, etp=8), "borrows its ranks from dp_shard x cp = 2 (etp 8)"),
])
def test_etp_is_1_or_tp_beside_ep_and_says_where_ep_borrows_its_ranks(dims, sentence):
    """torchtitan's ParallelDims._validate: etp in (1, tp); etp == tp: ep divides dp_shard x cp; etp == 1: ep is a
    multiple of cp x tp dividing dp_shard x cp x tp."""
    with pytest.raises(LaunchError, match=sentence.replace("(", r"\(").replace(")", r"\)")) as err:
        check_layout(dims, dims.world_size, 8, spec=MIXTRAL, seq_len=4096)
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")
    check_layout(dataclasses.replace(dims, etp=dims.tp, ep=2, dp_shard=4), 4 * dims.tp, 8, spec=MIXTRAL)


def test_a_record_written_before_etp_loads_with_whole_experts():
    plan = Plan(model="mixtral-8x22b", **{**MIXTRAL_TP8, "strategy": "fsdp"}).validate()
    data = plan.to_dict()
    assert data["parallel"]["etp"] == 1
    del data["parallel"]["etp"]
    assert Plan.from_dict(data).parallel == plan.parallel


def test_etp_tp_splits_the_routed_expert_states_over_tp_too():
    """zero1 replicates weights and grads: whole experts on each of ep 8 ranks hold 1/8 of the routed experts;
    split over tp 8 besides, 1/64. The rest is 1/tp 8 either way."""
    whole = estimate(MIXTRAL, TrainSetup(**MIXTRAL_TP8, etp=1))
    split = estimate(MIXTRAL, TrainSetup(**MIXTRAL_TP8, etp=8))
    routed = 56 * 8 * 3 * 6144 * 16384 * 2
    assert whole["weights"] - split["weights"] == pytest.approx(routed * (1 / 8 - 1 / 64), rel=1e-6)
    assert whole["grads"] - split["grads"] == pytest.approx(routed * (1 / 8 - 1 / 64), rel=1e-6)
    fsdp = {**MIXTRAL_TP8, "strategy": "fsdp"}  # sharded over all 64 ranks either way (torchtitan's dp_shard_mod_ep)
    assert (estimate(MIXTRAL, TrainSetup(**fsdp, etp=1))["weights"]
            == pytest.approx(estimate(MIXTRAL, TrainSetup(**fsdp, etp=8))["weights"], rel=1e-6))


def test_expert_tp_keeps_each_routed_copys_rows_whole_on_every_tp_rank():
    """Per MoE layer and token in bf16 the router's 8 fp32 logits, 2 scores and 2 int64 indices are whole on each
    tp rank; under etp 8 so are each of the 2 copies' input and combine rows (2 x 6144 x 2 B) and 28 B of routing,
    which etp 1 splits over tp with the tokens. What a layer saves per token differs by that x (1 - 1/8)."""
    router = 8 * 4 + 2 * (4 + 8)
    copies = 2 * (2 * 2 * 6144 + 28)
    whole, split = (TrainSetup(**{**MIXTRAL_TP8, "activation_checkpointing": "none"}, etp=e) for e in (1, 8))
    assert ep.moe_whole_bytes_per_token(MIXTRAL, ComputeMode.HALF, whole.parallel) == router
    assert ep.moe_whole_bytes_per_token(MIXTRAL, ComputeMode.HALF, split.parallel) == router + copies
    assert (mem.layer_bytes_per_token(MIXTRAL, split) - mem.layer_bytes_per_token(MIXTRAL, whole)
            == pytest.approx(copies * (1 - 1 / 8)))


def test_etp_tp_dispatches_tp_times_the_tokens_over_an_ep_group_tp_times_wider():
    """tp 8, ep 8: etp 1 splits the 4,096 tokens over the tp ranks before the dispatch and its ep group is the
    node's 8 GPUs (NVLink); etp 8 dispatches all of them from every tp rank over 64 ranks (the network)."""
    hw = hardware_for(PlanRequest(gpu="H800", gpus_per_node=8, nodes=64), Hardware())
    setup = TrainSetup(strategy="fsdp", precision="bf16", nodes=64, gpus_per_node=8, tp=8, ep=8, seq_len=4096)
    size = 4096 * 8 * 7168 * 2 * 7 / 8 * 4 * 58  # tokens x top-8 x hidden x bf16, (ep - 1) / ep, 4 passes, 58 layers
    nvlink = hw.facts.nvlink_bytes_per_s * LINK_EFFICIENCY
    assert expert_all_to_all_seconds(DSV3, setup, hw, hw.facts) == pytest.approx(size / 8 / nvlink)
    network = hw.network_bytes_per_s * LINK_EFFICIENCY
    split = dataclasses.replace(setup, etp=8)
    assert expert_all_to_all_seconds(DSV3, split, hw, hw.facts) == pytest.approx(size / network)


def _plan(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_big_experts_that_do_not_fit_whole_are_split_over_tp(capsys):
    """Mixtral-8x22B's 8 experts of 3 x 6144 x 16384 under zero1 and tp 8 on 64 H100: whole on each of ep 8
    ranks they need over 100 GiB per GPU; split over tp too (etp 8) they fit, and the reasons say so."""
    plan = _plan(capsys, "--model", "mixtral-8x22b", "--gpus", "8", "--nodes", "8", "--gpu", "H100", "--tp", "8",
                 "--pp", "1", "--strategy", "zero1", "--seq-len", "4096")
    assert plan["parallel"]["etp"] == 8 and plan["parallel"]["ep"] == 8
    reason = next(r for r in plan["reasons"] if "over etp" in r)
    assert ("ep 8 holds 1/8 of the routed experts (and their states) on each tp group, split over its 8 GPUs (etp 8): "
            "1/64 per GPU, over etp 1 (ep 8: needs 10") in reason


def test_fine_grained_experts_stay_whole_and_their_tokens_split_over_tp(capsys):
    """DeepSeek-V3's 256 experts of width 2048 at tp 8 on 512 H800: whole on each tp rank (etp 1) its ep 8 is
    the node's tp group and dispatches 1/8 of the tokens on NVLink; etp 8 moves 8 x the tokens over the network."""
    plan = _plan(capsys, "--model", "deepseek-v3", "--gpus", "8", "--nodes", "64", "--gpu", "H800", "--tp", "8",
                 "--seq-len", "4096")
    assert plan["parallel"]["etp"] == 1 and plan["parallel"]["ep"] > 1
    reason = next(r for r in plan["reasons"] if "over etp" in r)
    assert "whole on each GPU, their tokens split over tp 8 (etp 1)" in reason and ", over etp 8 (ep " in reason
    forced = _plan(capsys, "--model", "deepseek-v3", "--gpus", "8", "--nodes", "64", "--gpu", "H800", "--tp", "8",
                   "--seq-len", "4096", "--etp", "8")
    assert forced["parallel"]["etp"] == 8 and forced["predicted"]["tokens_per_s"] < plan["predicted"]["tokens_per_s"]
