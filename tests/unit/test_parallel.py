"""The parallelism record: how strategies map onto it, its one validation, and plans written before it."""

import pytest
import yaml

from launcher.errors import LaunchError
from launcher.planning.models import load_model_spec
from launcher.planning.parallel import ParallelDims, check_layout
from launcher.planning.plan import Plan, TrainSetup


@pytest.mark.parametrize("strategy, nodes, gpus, tp, pp, expected", [
    ("ddp", 1, 8, 1, 1, (8, 1)),
    ("zero1", 2, 8, 1, 1, (16, 1)),  # ZeRO-1/2 replicate the weights: their sharded states are not dp_shard
    ("fsdp", 2, 8, 1, 1, (1, 16)),
    ("zero3", 1, 8, 2, 1, (1, 4)),
    ("hsdp", 4, 8, 1, 1, (4, 8)),  # sharded in the node, replicated across nodes
    ("hsdp", 4, 8, 2, 1, (4, 4)),  # tp takes 2 of a node's 8 GPUs: shard over the other 4
    ("zero1", 1024, 8, 8, 16, (64, 1)),  # Llama 3 405B: TP8 x PP16 x DP64
])
def test_strategy_names_the_data_parallel_part(strategy, nodes, gpus, tp, pp, expected):
    dims = TrainSetup(strategy=strategy, nodes=nodes, gpus_per_node=gpus, tp=tp, pp=pp).parallel
    assert (dims.dp_replicate, dims.dp_shard) == expected
    assert dims.world_size == nodes * gpus


def test_predicates_and_global_batch_count_data_parallel_ranks_only():
    setup = TrainSetup(strategy="fsdp", nodes=2, gpus_per_node=8, tp=4, pp=2, micro_batch=2,
                       gradient_accumulation_steps=8)
    dims = setup.parallel
    assert dims.tp_enabled and dims.pp_enabled and not dims.cp_enabled and not dims.pure_data_parallel
    assert TrainSetup(strategy="hsdp", nodes=4, gpus_per_node=8).parallel.dp_hybrid
    assert not TrainSetup(strategy="hsdp", nodes=1, gpus_per_node=8).parallel.dp_hybrid  # one node: FSDP's mesh
    assert dims.pp_microbatches == 8 and dims.dp == 2
    assert setup.global_batch == 2 * 8 * 2
    assert TrainSetup(nodes=2, gpus_per_node=8).parallel.pure_data_parallel


SPEC_405B = load_model_spec("405b")  # 126 layers, 128 heads, 8 KV heads


@pytest.mark.parametrize("dims, world, gpus, seq, message", [
    (ParallelDims(tp=8, pp=16, dp_replicate=63), 8192, 8, 8192, "covers 8064 ranks, not the 8192"),
    (ParallelDims(tp=3, dp_replicate=1), 8, 8, 8192, "does not divide the 8 GPUs"),
    (ParallelDims(tp=16, dp_replicate=1), 16, 8, 8192, "spans more than the 8 GPUs of a node"),
    (ParallelDims(pp=256, dp_replicate=1), 256, 8, 8192, "126 layers, embedding and LM head do not fill 256"),
    (ParallelDims(tp=8, pp=2, dp_replicate=1, pp_schedule="interleaved-1f1b", pp_virtual_stages=2,
                  pp_microbatches=3), 16, 8, 8192, "not a multiple of pp 2"),
    (ParallelDims(pp=2, dp_replicate=1, pp_virtual_stages=2), 2, 8, 8192, "need --pp-schedule interleaved-1f1b"),
    (ParallelDims(ep=2, dp_shard=2), 2, 8, 8192, "has no experts"),
    (ParallelDims(cp=4, dp_shard=1), 4, 8, 8196, "2 x cp = 8 equal chunks"),
    (ParallelDims(pp_schedule="zb-v"), 1, 8, 8192, "is not one of gpipe, 1f1b, interleaved-1f1b"),
])
def test_bad_layouts_are_one_sentence(dims, world, gpus, seq, message):
    with pytest.raises(LaunchError, match=message):
        check_layout(dims, world, gpus, spec=SPEC_405B, seq_len=seq)


def test_ep_borrows_all_of_cp():
    """torchtitan's ParallelDims: ep = dp_shard_in_ep x cp, so an ep below or beside cp has no mesh."""
    mixtral = load_model_spec("mixtral-8x7b")
    with pytest.raises(LaunchError, match="choose an ep that is a multiple of 4"):
        check_layout(ParallelDims(dp_shard=2, cp=4, ep=2), 8, 8, spec=mixtral, seq_len=8192)
    check_layout(ParallelDims(dp_shard=2, cp=2, ep=4), 4, 8, spec=mixtral, seq_len=8192)


def test_heads_must_split_over_tp_and_kv_heads_split_or_replicate():
    spec = load_model_spec("gpt2")  # 12 heads, 12 KV heads
    with pytest.raises(LaunchError, match="12 attention heads, which tp 8 does not divide"):
        check_layout(ParallelDims(tp=8), 8, 8, spec=spec, seq_len=1024)
    llama = load_model_spec("8b")  # 32 heads, 8 KV heads: tp 16 replicates each KV head twice
    check_layout(ParallelDims(tp=16), 16, 16, spec=llama, seq_len=1024)
    check_layout(ParallelDims(tp=16), 16, 8, spec=llama, seq_len=1024, cross_node=True)  # forced across nodes


def test_llama3_layout_is_valid():
    dims = TrainSetup(strategy="zero1", nodes=1024, gpus_per_node=8, tp=8, pp=16, pp_schedule="interleaved-1f1b",
                      pp_virtual_stages=1, gradient_accumulation_steps=16).parallel
    check_layout(dims, 8192, 8, spec=load_model_spec("70b"), seq_len=8192)  # 80 layers over 16 stages


def test_a_plan_round_trips_its_record_and_an_older_plan_loads_as_data_parallel(tmp_path):
    plan = Plan(model="405b", strategy="zero1", nodes=128, gpus_per_node=8, tp=8, pp=2, gradient_accumulation_steps=4,
                activation_checkpointing="selective")
    plan.validate()
    data = yaml.safe_load(plan.to_yaml())
    assert data["parallel"] == {"dp_replicate": 64, "dp_shard": 1, "tp": 8, "pp": 2, "cp": 1, "ep": 1, "etp": 1,
                                "pp_schedule": "1f1b", "pp_microbatches": 4, "pp_virtual_stages": 1,
                                "sequence_parallel": True}
    assert Plan.from_dict(data).parallel == plan.parallel
    older = {k: v for k, v in data.items() if k != "parallel"}
    older["activation_checkpointing"] = True  # plans before the recompute modes wrote a boolean
    loaded = Plan.from_dict(older)
    assert loaded.parallel.pure_data_parallel and loaded.activation_checkpointing == "full"
    data["parallel"]["dp_replicate"] = 32
    with pytest.raises(LaunchError, match="does not match its strategy zero1"):
        Plan.from_dict(data)


def test_run_and_submit_plan_only_what_the_engines_run():
    """`llaunch plan` may recommend tp x pp at scale; the request `run` / `submit` make (prepare.make_job_plan) does
    not, and a plan with a layout the engines do not declare is refused in one sentence."""
    from launcher.planning.hardware import Hardware
    from launcher.planning.planner import PlanRequest, make_plan
    from launcher.planning.plan import check_runnable

    request = dict(model="405b", gpu="H100", gpus_per_node=8, nodes=1024, seq_len=8192, global_batch=8192)
    free = make_plan(PlanRequest(**request), Hardware())
    runnable = make_plan(PlanRequest(**request, runnable_only=True), Hardware())
    assert not free.parallel.pure_data_parallel
    assert runnable.parallel.pure_data_parallel
    check_runnable(runnable)
    # A forced pipeline is planned as forced, under a strategy whose engine runs stages (not ZeRO).
    piped = make_plan(PlanRequest(model="tinyllama-1.1b", gpu="H100", gpus_per_node=8, pp=2, runnable_only=True),
                      Hardware())
    assert (piped.parallel.pp, piped.parallel.dp) == (2, 4) and not piped.is_deepspeed
    check_runnable(piped)
    check_runnable(TrainSetup(strategy="fsdp", nodes=2, gpus_per_node=8, tp=8, pp=2))  # stages split over tp
    with pytest.raises(LaunchError, match=r"uses tp, which the ddp engine cannot run; use --strategy fsdp or hsdp"):
        check_runnable(TrainSetup(strategy="ddp", nodes=2, gpus_per_node=8, tp=8, pp=2))
    with pytest.raises(LaunchError, match=r"the ranks run expert parallelism without tp so far; keep --ep 1 or --tp 1"):
        check_runnable(TrainSetup(strategy="fsdp", nodes=2, gpus_per_node=8, tp=2, ep=2))
    with pytest.raises(LaunchError, match=r"uses tp, which the zero1 engine cannot run; use --strategy fsdp or hsdp"):
        check_runnable(TrainSetup(strategy="zero1", nodes=2, gpus_per_node=8, tp=8))
    check_runnable(TrainSetup(strategy="fsdp", nodes=2, gpus_per_node=8, tp=8))  # FSDP2 runs tp (issue 31)
    with pytest.raises(LaunchError, match=r"--cp needs torch's ring attention, which in torch 2.13 dispatches only "
                                          r"CUDA's flash, memory-efficient and cuDNN SDPA kernels"):
        check_runnable(TrainSetup(strategy="fsdp", gpus_per_node=8, cp=2))
    check_runnable(TrainSetup(strategy="fsdp", activation_checkpointing="selective"))  # op-level SAC (recompute.py)
    with pytest.raises(LaunchError, match="selective activation checkpointing is not something the zero3 engine runs; "
                                          "use none or full"):
        check_runnable(TrainSetup(strategy="zero3", activation_checkpointing="selective"))
