"""The order in which parallelisms wrap a decoder; each family passes its own TP layer plan."""

from torch import nn

from longctx.parallelisms.activation_checkpoint import apply_ac, apply_activation_offload, apply_mlp_tiling
from longctx.parallelisms.compile import apply_compile
from longctx.parallelisms.fsdp import apply_fsdp
from longctx.parallelisms.parallel_dims import ParallelDims
from longctx.parallelisms.settings import ModelSettings
from longctx.parallelisms.tensor_parallel import apply_tp


def parallelize_decoder(model: nn.Module, parallel_dims: ParallelDims, settings: ModelSettings, layer_plan: dict) -> nn.Module:
    # TP first: it swaps parameters for DTensors that every later wrapper must see.
    if parallel_dims.tp > 1:
        apply_tp(model, parallel_dims.mesh("tp"), layer_plan, settings.loss_parallel)
    # CP changes no parameter: attention needs the groups of its exchanges, the decoder the
    # query chunks of this rank (for their masks).
    if parallel_dims.cp > 1:
        model.context_parallel = parallel_dims.context_parallel()
        for block in model.layers.values():
            block.attention.context_parallel = model.context_parallel
    # Before compile: tile sizes and head groups are constants of the compiled graph.
    for block in model.layers.values():
        block.attention.kv_groups = settings.attention_groups
    if settings.mlp_chunk:
        apply_mlp_tiling(model, settings.mlp_chunk)
    # Compile before checkpoint-wrapping: the other order fails under TP (docs/design.md, traps).
    # Per-op selective checkpointing is the exception: the compiler enforces its policy.
    apply_ac(model, settings.checkpointing, modes=("op",))
    if settings.compile:
        apply_compile(model, settings.compile_backend)
    apply_ac(model, settings.checkpointing, modes=("full",))
    # Offload hooks go around the checkpointed (and compiled) call: dynamo does not trace them.
    if settings.activation_offload:
        apply_activation_offload(model, settings.checkpointing)
    # FSDP last, over whatever wrappers the blocks now wear; dp and cp ranks shard the weights.
    if settings.fsdp:
        apply_fsdp(model, parallel_dims.fsdp_mesh(), settings.compute_dtype, reshard_after_forward=settings.reshard_after_forward,
                   cpu_offload=settings.cpu_offload)
    return model
