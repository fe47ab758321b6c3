"""The ranks' device mesh, built from the plan's parallelism record (launcher.planning.parallel.ParallelDims).

One world mesh with a named dimension per kind of parallelism, in torchtitan's order (ParallelDims.build_mesh):
pp outermost, then the data-parallel replicas and shards, cp, and tp innermost, so that a tp group is a node's
neighbouring ranks. Every dimension is in the mesh, a size-1 one too, so a slice by name always exists; the
engines and the loop ask `RankMeshes` for the view they need instead of building groups of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from launcher.planning.parallel import ParallelDims

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class RankMeshes:
    dims: ParallelDims
    world: DeviceMesh
    flat: dict[str, DeviceMesh]  # the flattened views, kept here (torch no longer slices them from the root)

    @classmethod
    def build(cls, dims: ParallelDims, device_type: str) -> "RankMeshes":
        """Collective over the world: every rank calls it once, with the same record."""
        sizes = (dims.pp, dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp)
        world = init_device_mesh(device_type, sizes, mesh_dim_names=MESH_DIMS)
        flat = {
            "dp": world["dp_replicate", "dp_shard"]._flatten("dp"),  # ranks that read different data
            "dp_shard_cp": world["dp_shard", "cp"]._flatten("dp_shard_cp"),  # FSDP's shards (cp holds the same weights)
            "dp_cp": world["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp"),  # whose gradients are averaged
        }
        return cls(dims, world, flat)

    def __getitem__(self, name: str) -> DeviceMesh:
        return self.flat[name] if name in self.flat else self.world[name]

    @property
    def fsdp(self) -> DeviceMesh:
        """FSDP2's mesh: 1-D over dp_shard x cp, or HSDP's 2-D (dp_replicate, dp_shard x cp). Under the FSDP
        engine dp_replicate > 1 only for HSDP, whose replicas must not shard over each other even when a
        replica is one rank (a (2, 1) mesh holds whole weights, as its plan estimated)."""
        if self.dims.dp_replicate > 1:
            shard = "dp_shard_cp" if self.dims.cp_enabled else "dp_shard"  # (torch warns on a flattened one)
            return self.world["dp_replicate", shard]
        return self.flat["dp_cp"]

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
