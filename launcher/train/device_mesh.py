"""The ranks' device mesh, built from the plan's parallelism record (launcher.planning.parallel.ParallelDims).

One world mesh with a named dimension per kind of parallelism, in torchtitan's order (ParallelDims.build_mesh):
pp outermost, then the data-parallel replicas and shards, cp, and tp innermost, so that a tp group is a node's
neighbouring ranks. Every dimension is in the mesh, a size-1 one too, so a slice by name always exists; the
engines and the loop ask `RankMeshes` for the view they need instead of building groups of their own.

With expert parallelism, dp_shard is split in two, as torchtitan's ParallelDims does (_build_mesh_with_ep):
dp_shard_mod_ep x dp_shard_in_ep, ep being dp_shard_in_ep x cp (ep borrows all of cp and part of dp_shard,
launcher.planning.parallel.check_layout). dp_shard is then a flattened view, so every name above still
answers; `ep` is the mesh the experts are split over and `experts_dp` the one their gradients reduce over.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from launcher.planning.parallel import ParallelDims

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
EP_MESH_DIMS = ("pp", "dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "cp", "tp")  # with ep > 1


@dataclass(frozen=True)
class RankMeshes:
    dims: ParallelDims
    world: DeviceMesh
    flat: dict[str, DeviceMesh]  # the flattened views, kept here (torch no longer slices them from the root)

    @classmethod
    def build(cls, dims: ParallelDims, device_type: str) -> "RankMeshes":
        """Collective over the world: every rank calls it once, with the same record."""
        shard: tuple[str, ...] = ("dp_shard",)
        sizes = (dims.pp, dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp)
        if dims.ep_enabled:
            shard = ("dp_shard_mod_ep", "dp_shard_in_ep")
            sizes = (dims.pp, dims.dp_replicate, dims.dp_shard * dims.cp // dims.ep, dims.ep // dims.cp, dims.cp,
                     dims.tp)
        world = init_device_mesh(device_type, sizes, mesh_dim_names=EP_MESH_DIMS if dims.ep_enabled else MESH_DIMS)
        flat = {
            "dp": world["dp_replicate", *shard]._flatten("dp"),  # ranks that read different data
            "dp_shard_cp": world[*shard, "cp"]._flatten("dp_shard_cp"),  # FSDP's shards (cp holds the same weights)
            "dp_cp": world["dp_replicate", *shard, "cp"]._flatten("dp_cp"),  # whose gradients are averaged
        }
        if dims.ep_enabled:
            flat["dp_shard"] = world[shard]._flatten("dp_shard")
            flat["ep"] = world["dp_shard_in_ep", "cp"]._flatten("ep")  # the ranks that split the experts
        return cls(dims, world, flat)

    def __getitem__(self, name: str) -> DeviceMesh:
        return self.flat[name] if name in self.flat else self.world[name]

    @property
    def fsdp(self) -> DeviceMesh:
        """FSDP2's mesh: 1-D over dp_shard x cp, or HSDP's 2-D (dp_replicate, dp_shard x cp). Under the FSDP
        engine dp_replicate > 1 only for HSDP, whose replicas must not shard over each other even when a
        replica is one rank (a (2, 1) mesh holds whole weights, as its plan estimated)."""
        if self.dims.dp_replicate > 1:
            # a flattened dimension (cp's, ep's split of dp_shard) only where it must be: torch warns on one
            shard = "dp_shard_cp" if self.dims.cp_enabled or self.dims.ep_enabled else "dp_shard"
            return self.world["dp_replicate", shard]
        return self.flat["dp_cp"]

    @property
    def ep(self) -> DeviceMesh:
        """The ranks that split the experts between them (dp_shard_in_ep x cp); with ep 1, no mesh is built."""
        return self.flat["ep"]

    @property
    def experts_dp(self) -> DeviceMesh:
        """The ranks that hold the same experts: FSDP2 shards an expert weight over dp_shard_mod_ep (a size-1
        mesh too: FSDP's unit casts it under mixed precision) and replicates it over dp_replicate (HSDP)."""
        if self.dims.dp_replicate > 1:
            return self.world["dp_replicate", "dp_shard_mod_ep"]
        return self.world["dp_shard_mod_ep"]

    @property
    def data_rank(self) -> int:
        """This rank's shard of the data: tp, pp and cp ranks of one replica read the same batch."""
        return self.flat["dp"].get_local_rank()

    @property
    def data_ranks(self) -> int:
        return self.dims.dp

    @property
    def tp(self) -> DeviceMesh:
        return self.world["tp"]

    @property
    def pp(self) -> DeviceMesh:
        return self.world["pp"]

    @property
    def cp(self) -> DeviceMesh:
        return self.world["cp"]
