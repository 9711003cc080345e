"""FSDP2 (fully_shard) over the flattened dp_shard x cp mesh, HSDP when dp_replicate > 1."""

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> None:
    """cpu_offload keeps the fp32 parameters, gradients and optimizer state in host memory (the
    optimizer steps on the CPU): 16 bytes per parameter off the GPU, for the longest sequences,
    whose steps are long enough to hide the copies."""
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                  mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype))
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for block in model.layers.values():
        fully_shard(block, **kwargs)
    # Embedding, final norm and output go to the root group: with tied embeddings the one shared
    # parameter must sit in a single FSDP group (torch >= 2.13 refuses it in two).
    fully_shard(model, **kwargs)
    # The loss is already divided by the global token count, so gradients must be SUMMED across
    # dp and cp ranks; FSDP's default averaging would make them dp*cp times too small. One rank
    # already sums, and there the setting would cost a division pass over every gradient.
    if mesh.size() == 1:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
