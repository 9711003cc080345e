"""The device mesh (dp_replicate, dp_shard, cp = cp_shard x cp_ulysses, tp) and the checks that
refuse bad layouts early."""

import dataclasses
from dataclasses import dataclass
from functools import cached_property

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from longctx.base import ConfigError, round_up
from longctx.parallelisms.context_parallel import ContextParallel, slice_for_cp
from longctx.parallelisms.ulysses import kv_heads_to_send


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int  # -1: whatever world_size leaves after the other degrees
    cp: int
    tp: int
    world_size: int
    # cp = cp_shard x cp_ulysses; -1: the largest Ulysses degree the heads allow (set by for_heads).
    cp_ulysses: int = -1

    def __post_init__(self):
        for name in ("dp_replicate", "cp", "tp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.dp_shard == -1:
            others = self.dp_replicate * self.cp * self.tp
            if self.world_size % others:
                raise ConfigError(
                    f"world_size={self.world_size} is not divisible by dp_replicate*cp*tp = "
                    f"{self.dp_replicate}*{self.cp}*{self.tp}; change the degrees or the number of processes"
                )
            object.__setattr__(self, "dp_shard", self.world_size // others)
        if self.cp_ulysses != -1 and (self.cp_ulysses < 1 or self.cp % self.cp_ulysses):
            raise ConfigError(
                f"context_parallel_ulysses_degree={self.cp_ulysses} does not divide context_parallel_degree={self.cp}; "
                "give a divisor of it, or -1 for the largest the heads allow"
            )
        if self.cp == 1:
            object.__setattr__(self, "cp_ulysses", 1)
        if self.dp_shard < 1:
            raise ConfigError(f"data_parallel_shard_degree={self.dp_shard} must be -1 or >= 1")
        product = self.dp_replicate * self.dp_shard * self.cp * self.tp
        if product != self.world_size:
            raise ConfigError(
                f"dp_replicate({self.dp_replicate}) * dp_shard({self.dp_shard}) * cp({self.cp}) * "
                f"tp({self.tp}) = {product} != world_size({self.world_size}); make the product match "
                "the number of processes (or set data_parallel_shard_degree = -1)"
            )

    @classmethod
    def from_config(cls, parallelism, world_size: int, n_heads: int, n_kv_heads: int) -> "ParallelDims":
        """The layout of a job config's [parallelism] section on world_size processes, checked against
        the model's head counts and with the cp split settled: what train.py, the scripts, the
        planner and the benches all build."""
        p = parallelism
        return cls(dp_replicate=p.data_parallel_replicate_degree, dp_shard=p.data_parallel_shard_degree,
                   cp=p.context_parallel_degree, tp=p.tensor_parallel_degree, world_size=world_size,
                   cp_ulysses=p.context_parallel_ulysses_degree).for_heads(n_heads, n_kv_heads)

    def for_heads(self, n_heads: int, n_kv_heads: int) -> "ParallelDims":
        """Checks tp and cp against the head counts, before any process group, and settles the cp
        split: Ulysses takes the largest degree dividing cp and the local query heads whose kv heads
        can be split or replicated (ulysses.kv_heads_to_send), the sequence shard takes the rest."""
        tp, cp = self.tp, self.cp
        if n_heads % tp:
            raise ConfigError(
                f"n_heads={n_heads} is not divisible by tensor_parallel_degree={tp}; use a tp that divides {n_heads}"
            )
        if n_kv_heads % tp:
            raise ConfigError(
                f"n_kv_heads={n_kv_heads} is not divisible by tensor_parallel_degree={tp}; "
                f"use tp <= {n_kv_heads} dividing it and put the other ranks in cp or dp"
            )
        heads, kv_heads = n_heads // tp, n_kv_heads // tp

        def fits(ulysses: int) -> bool:
            return heads % ulysses == 0 and kv_heads_to_send(kv_heads, ulysses) is not None

        best = max(u for u in range(1, cp + 1) if cp % u == 0 and fits(u))
        if self.cp_ulysses != -1 and not fits(self.cp_ulysses):
            raise ConfigError(
                f"context_parallel_ulysses_degree={self.cp_ulysses} does not fit the local heads "
                f"(n_heads/tp = {n_heads}/{tp} = {heads} query, {kv_heads} kv: it must divide the query heads "
                f"and divide or be a multiple of the kv heads); use {best} (cp {cp} = ulysses {best} x shard "
                f"{cp // best}) or -1 for that automatic split"
            )
        return dataclasses.replace(self, cp_ulysses=best if self.cp_ulysses == -1 else self.cp_ulysses)

    @property
    def cp_shard(self) -> int:
        return self.cp // self.cp_ulysses

    @property
    def seq_multiple(self) -> int:
        """Sequence lengths must be multiples of this: every cp rank holds an equal piece (two
        chunks of one when the sequence is sharded) that tensor parallel's sequence parallel splits."""
        return self.cp * self.tp * (2 if self.cp_shard > 1 else 1)

    def padded_len(self, seq_len: int) -> int:
        """seq_len rounded up to seq_multiple; the padding is masked from the loss."""
        return round_up(seq_len, self.seq_multiple)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard * self.cp > 1 or self.dp_replicate > 1

    @cached_property
    def _meshes(self) -> dict[str, DeviceMesh]:
        """Builds the mesh (needs an initialized process group). Named sub-meshes:

        | name         | dims                         | used for                                     |
        |--------------|------------------------------|----------------------------------------------|
        | dp_replicate | dp_replicate                 | HSDP: gradient all-reduce between replicas   |
        | dp_shard_cp  | dp_shard x cp (flattened)    | FSDP2 sharding; cp ranks hold the same weights |
        | dp           | dp_replicate x dp_shard      | which rows of the global batch a rank reads  |
        | dp_cp        | dp_replicate x dp_shard x cp | global token count and the logged loss       |
        | cp           | cp_shard x cp_ulysses        | slicing the sequence, gathering per-token outputs |
        | cp_ulysses   | cp_ulysses                   | Ulysses all-to-all (heads <-> sequence)      |
        | cp_shard     | cp_shard                     | all-gather of K/V (head-tail sequence chunks) |
        | tp           | tp                           | tensor + sequence parallel, loss parallel    |

        cp_ulysses sits next to tp, inside cp_shard: its all-to-alls move q, k, v and the output
        (4 activations per layer) against the all-gather's k and v, so they get the closer ranks.
        """
        if self.cp_ulysses == -1:
            raise RuntimeError("the cp split is not settled: build ParallelDims through for_heads(n_heads, n_kv_heads)")
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        names = ("dp_replicate", "dp_shard", "cp_shard", "cp_ulysses", "tp")
        shape = (self.dp_replicate, self.dp_shard, self.cp_shard, self.cp_ulysses, self.tp)
        world = init_device_mesh(device_type, shape, mesh_dim_names=names)
        # Keep the flattened meshes ourselves (slicing them back out of the root is deprecated).
        return {
            "world": world,
            **{name: world[name] for name in names},
            "cp": world["cp_shard", "cp_ulysses"]._flatten("cp"),
            "dp_shard_cp": world["dp_shard", "cp_shard", "cp_ulysses"]._flatten("dp_shard_cp"),
            "dp": world["dp_replicate", "dp_shard"]._flatten("dp"),
            "dp_cp": world["dp_replicate", "dp_shard", "cp_shard", "cp_ulysses"]._flatten("dp_cp"),
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

    def shard_for_cp(self, batch: dict) -> dict:
        """This cp rank's tokens of every per-token field of a batch, in the head-tail order of the
        sequence shard (parallelisms/context_parallel.py). document_ids stay whole: attention builds
        each query chunk's slice of the document mask from them."""
        if self.cp == 1:
            return batch
        cp_rank = self.mesh("cp").get_local_rank()
        return {k: v if k == "document_ids" else slice_for_cp(v, cp_rank, self.cp, self.cp_shard) for k, v in batch.items()}

    def context_parallel(self) -> ContextParallel:
        """The groups and shard index attention needs (cp > 1)."""
        return ContextParallel(
            ulysses_group=self.mesh("cp_ulysses").get_group() if self.cp_ulysses > 1 else None,
            shard_group=self.mesh("cp_shard").get_group() if self.cp_shard > 1 else None,
            degree=self.cp,
            shard=self.cp_shard,
            shard_rank=self.mesh("cp_shard").get_local_rank(),
        )
