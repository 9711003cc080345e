"""Writing whole tensors into parameters that may be sharded (DTensor) under any layout."""

import torch
from torch.distributed.tensor import DTensor, Replicate


@torch.no_grad()
def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """param <- full, where `full` has param's global shape; a DTensor keeps only its own shard.
    Replicate -> param's placements is a local slice (no communication), and covers FSDP's
    _StridedShard over a TP shard as well as plain Shard."""
    if isinstance(param, DTensor):
        mesh = param.device_mesh
        replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
        param.to_local().copy_(replicated.redistribute(mesh, param.placements).to_local())
    else:
        param.copy_(full)
