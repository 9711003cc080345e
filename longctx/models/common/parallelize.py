"""The order in which parallelisms wrap a decoder; each family passes its own TP layer plan."""

import torch
from torch import nn

from longctx.parallelisms.activation_checkpoint import apply_ac, apply_activation_offload, apply_mlp_tiling, is_per_op
from longctx.parallelisms.compile import apply_compile
from longctx.parallelisms.fsdp import apply_fsdp
from longctx.parallelisms.parallel_dims import ParallelDims
from longctx.parallelisms.tensor_parallel import apply_tp


def parallelize_decoder(model: nn.Module, parallel_dims: ParallelDims, job_config, layer_plan: dict) -> nn.Module:
    # TP first: it swaps parameters for DTensors that every later wrapper must see.
    if parallel_dims.tp > 1:
        loss_parallel = not job_config.parallelism.disable_loss_parallel
        apply_tp(model, parallel_dims.mesh("tp"), layer_plan, loss_parallel)
    # CP changes no parameter: attention needs the groups of its exchanges, the decoder the
    # query chunks of this rank (for their masks).
    if parallel_dims.cp > 1:
        model.context_parallel = parallel_dims.context_parallel()
        for block in model.layers.values():
            block.attention.context_parallel = model.context_parallel
    # Compile before checkpoint-wrapping: the other order fails under TP (docs/design.md, traps).
    # Per-op selective checkpointing is the exception: the compiler enforces its policy.
    ac = job_config.activation_checkpoint
    if ac.mlp_chunk_size:  # before compile: the tile size is a constant of the compiled graph
        apply_mlp_tiling(model, ac.mlp_chunk_size)
    per_op = is_per_op(ac.mode, ac.selective_ac_option)
    if per_op:
        apply_ac(model, ac.mode, ac.selective_ac_option)
    if job_config.compile.enable:
        apply_compile(model, job_config.compile.backend)
    if not per_op:
        apply_ac(model, ac.mode, ac.selective_ac_option)
    # Offload hooks go around the checkpointed (and compiled) call: dynamo does not trace them.
    if ac.cpu_offload:
        apply_activation_offload(model, ac.mode, ac.selective_ac_option)
    # FSDP last, over whatever wrappers the blocks now wear; dp and cp ranks shard the weights.
    if parallel_dims.fsdp_enabled or torch.cuda.is_available():
        param_dtype = torch.bfloat16 if job_config.training.mixed_precision_param == "bfloat16" else torch.float32
        if not torch.cuda.is_available():
            param_dtype = torch.float32  # CPU runs are the fp32 reference
        # "never" keeps each block's bf16 parameters gathered from forward to backward: one
        # all-gather per block per step instead of two, for the memory of one bf16 model copy.
        reshard = job_config.parallelism.fsdp_reshard_after_forward != "never"
        apply_fsdp(model, parallel_dims.fsdp_mesh(), param_dtype, reshard_after_forward=reshard,
                   cpu_offload=job_config.training.enable_cpu_offload)
    return model
