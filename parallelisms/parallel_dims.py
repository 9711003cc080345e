"""The 4D device mesh (dp_replicate, dp_shard, cp, tp) and the checks that refuse bad layouts early."""

from dataclasses import dataclass
from functools import cached_property

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int  # -1: whatever world_size leaves after the other degrees
    cp: int
    tp: int
    world_size: int

    def __post_init__(self):
        for name in ("dp_replicate", "cp", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.dp_shard == -1:
            others = self.dp_replicate * self.cp * self.tp
            if self.world_size % others:
                raise ValueError(
                    f"world_size={self.world_size} is not divisible by dp_replicate*cp*tp = "
                    f"{self.dp_replicate}*{self.cp}*{self.tp}; change the degrees or the number of processes"
                )
            object.__setattr__(self, "dp_shard", self.world_size // others)
        if self.dp_shard < 1:
            raise ValueError(f"data_parallel_shard_degree={self.dp_shard} must be -1 or >= 1")
        product = self.dp_replicate * self.dp_shard * self.cp * self.tp
        if product != self.world_size:
            raise ValueError(
                f"dp_replicate({self.dp_replicate}) * dp_shard({self.dp_shard}) * cp({self.cp}) * "
                f"tp({self.tp}) = {product} != world_size({self.world_size}); make the product match "
                "the number of processes (or set data_parallel_shard_degree = -1)"
            )

    def validate_heads(self, n_heads: int, n_kv_heads: int) -> None:
        """Head-count checks of tensor and Ulysses context parallelism, before any process group."""
        tp, cp = self.tp, self.cp
        if n_heads % tp:
            raise ValueError(f"n_heads={n_heads} is not divisible by tensor_parallel_degree={tp}; use a tp that divides {n_heads}")
        if n_kv_heads % tp:
            raise ValueError(
                f"n_kv_heads={n_kv_heads} is not divisible by tensor_parallel_degree={tp}; "
                f"use tp <= {n_kv_heads} dividing it and put the other ranks in cp or dp"
            )
        if (n_heads // tp) % cp:
            raise ValueError(
                f"local query heads n_heads/tp = {n_heads}/{tp} = {n_heads // tp} are not divisible by "
                f"context_parallel_degree={cp} (Ulysses splits heads); use a cp dividing {n_heads // tp}"
            )
        kv_local = n_kv_heads // tp
        if kv_local % cp and cp % kv_local:
            raise ValueError(
                f"local kv heads n_kv_heads/tp = {kv_local} and context_parallel_degree={cp}: neither divides "
                f"the other, so kv heads can be neither split nor replicated; use a cp that divides or is a multiple of {kv_local}"
            )

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard * self.cp > 1 or self.dp_replicate > 1

    # torchtitan's optimizer builder asks these of its own ParallelDims.
    ep_enabled = False
    pp_enabled = False

    @cached_property
    def _meshes(self) -> dict[str, DeviceMesh]:
        """Builds the mesh (needs an initialized process group). Named sub-meshes:

        | name         | dims                         | used for                                     |
        |--------------|------------------------------|----------------------------------------------|
        | dp_replicate | dp_replicate                 | HSDP: gradient all-reduce between replicas   |
        | dp_shard_cp  | dp_shard x cp (flattened)    | FSDP2 sharding; cp ranks hold the same weights |
        | dp           | dp_replicate x dp_shard      | which rows of the global batch a rank reads  |
        | dp_cp        | dp_replicate x dp_shard x cp | global token count and the logged loss       |
        | cp           | cp                           | Ulysses all-to-all, sequence slicing         |
        | tp           | tp                           | tensor + sequence parallel, loss parallel    |
        """
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        names = ("dp_replicate", "dp_shard", "cp", "tp")
        world = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.cp, self.tp), mesh_dim_names=names)
        # Keep the flattened meshes ourselves (slicing them back out of the root is deprecated).
        return {
            "world": world,
            **{name: world[name] for name in names},
            "dp_shard_cp": world["dp_shard", "cp"]._flatten("dp_shard_cp"),
            "dp": world["dp_replicate", "dp_shard"]._flatten("dp"),
            "dp_cp": world["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp"),
        }

    @property
    def world_mesh(self) -> DeviceMesh:
        return self._meshes["world"]

    def mesh(self, name: str) -> DeviceMesh:
        """A named 1D sub-mesh (table in `_meshes`)."""
        return self._meshes[name]

    def fsdp_mesh(self) -> DeviceMesh:
        """1D (dp_shard_cp) for FSDP, 2D (dp_replicate, dp_shard_cp) for HSDP."""
        if self.dp_replicate > 1:
            return self.world_mesh["dp_replicate", "dp_shard_cp"]
        return self.mesh("dp_shard_cp")
