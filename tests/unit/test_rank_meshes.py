"""The ranks' device mesh with expert parallelism (launcher/train/device_mesh.py), built on a fake process group
in one process, and the experts' grouped GEMM (launcher/train/expert_parallel.py) against one matmul per expert.
Training with ep end to end is tests/distributed/test_expert_parallel.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from launcher.planning.parallel import ParallelDims
from launcher.train.device_mesh import RankMeshes
from launcher.train.expert_parallel import grouped_linear, grouped_mm_runs


@pytest.fixture
def fake_world():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def join(rank: int, world: int):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)

    yield join
    dist.destroy_process_group()


def test_hsdp_with_ep_splits_experts_within_a_replica_and_reduces_them_over_the_rest(fake_world):
    """8 ranks as 2 replicas x 4 shards, ep 2 (torchtitan's dp_shard_mod_ep 2 x dp_shard_in_ep 2): rank 5 splits
    the experts with its neighbour 4 and holds the same ones as 1, 3 and 7, across both replicas."""
    fake_world(5, 8)
    meshes = RankMeshes.build(ParallelDims(dp_replicate=2, dp_shard=4, ep=2), "cpu")
    assert meshes.ep.mesh.tolist() == [4, 5]
    assert meshes.experts_dp.mesh_dim_names == ("dp_replicate", "dp_shard_mod_ep")
    assert meshes.experts_dp.mesh.tolist() == [[1, 3], [5, 7]]
    # The views that existed before ep answer as they did: FSDP's HSDP mesh, dp_shard, the data rank.
    assert meshes.fsdp.mesh.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert meshes["dp_shard"].mesh.tolist() == [4, 5, 6, 7]
    assert meshes.data_rank == 5 and meshes.data_ranks == 8


def test_ep_over_all_shards_leaves_one_expert_shard(fake_world):
    fake_world(2, 4)
    meshes = RankMeshes.build(ParallelDims(dp_shard=4, ep=4), "cpu")
    assert meshes.ep.mesh.tolist() == [0, 1, 2, 3] and meshes.experts_dp.size() == 1
    assert meshes.fsdp.mesh.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("width", [8, 6])  # 8 fp32 = 32-byte rows: grouped_mm; 6 = 24 bytes: one matmul per expert
def test_grouped_linear_is_each_experts_matmul_forward_and_backward(width):
    torch.manual_seed(0)
    counts = [3, 0, 5]  # an expert without rows still gets its (zero) gradient
    rows = torch.randn(sum(counts), width, requires_grad=True)
    weight = torch.randn(3, 4 * width, width, requires_grad=True)
    assert grouped_mm_runs(rows, weight) == (width == 8)
    out = grouped_linear(rows, weight, torch.tensor(counts))
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    ref_rows, ref_weight = rows.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = torch.cat([part @ w.T for part, w in zip(ref_rows.split(counts), ref_weight)])
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(rows.grad, ref_rows.grad)
    torch.testing.assert_close(weight.grad, ref_weight.grad)
    assert weight.grad[1].abs().sum() == 0


def test_hsdp_x_tp_shards_each_weight_over_a_3d_mesh_and_the_fsdp_engine_steps_on_it(fake_world):
    """Issue 31's 3-D composition: 2 nodes x 4 ranks as HSDP (2 replicas x 2 shards) x tp 2, through the engine
    the loop builds (build_engine): a q_proj weight is replicated over dp_replicate, sharded over dp_shard and
    split colwise over tp (a quarter of its rows here), its gradient likewise, and a clipped step runs. One
    process on a fake process group checks the composition; the numbers against DDP are 4-rank tests' (tp x
    FSDP in tests/distributed), since on one node HSDP is FSDP (its shards fill the node)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard
    from transformers import AutoModelForCausalLM, LlamaConfig

    from launcher.config import TrainingSection
    from launcher.planning.plan import Plan
    from launcher.train.engines import build_engine

    fake_world(0, 8)  # rank 0: the engine broadcasts rank 0's weights, which a fake group cannot do for another
    plan = Plan(model="tiny", strategy="hsdp", precision="fp32", optimizer="adamw_torch", nodes=2, gpus_per_node=4,
                tp=2, device="cpu", seq_len=32)
    assert (plan.parallel.dp_replicate, plan.parallel.dp_shard, plan.parallel.tp) == (2, 2, 2)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    engine = build_engine(model, plan, TrainingSection(), torch.device("cpu"), {},
                          RankMeshes.build(plan.parallel, "cpu"))
    weight = engine.module.model.layers[0].self_attn.q_proj.weight
    assert weight.device_mesh.mesh_dim_names == ("dp_replicate", "dp_shard", "tp")
    replicated, sharded, split = weight.placements
    # FSDP2 shards over dp_shard what tp split (torch writes that placement _StridedShard)
    assert replicated == Replicate() and sharded == _StridedShard(0, split_factor=2) and split == Shard(0)
    assert weight.shape == (32, 32) and weight.to_local().shape == (8, 32)
    batch = {"input_ids": torch.randint(0, 128, (2, 32)), "labels": torch.randint(0, 128, (2, 32))}
    engine.backward(engine.forward(batch).loss)
    assert weight.grad.placements == weight.placements and weight.grad.to_local().shape == (8, 32)
    assert torch.isfinite(engine.step(1.0))
