"""Tensor parallel (Megatron-LM, Shoeybi et al. 2019) with sequence parallel (Korthikanti et al. 2022)
applied from plans: dicts from submodule name to DTensor parallel style."""

import contextlib

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)


def decoder_top_plan(loss_parallel: bool) -> dict:
    """Embedding, final norm and output projection of a decoder."""
    return {
        # Vocab-sharded embedding; its output leaves sequence-sharded for the first SP norm.
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        # The chunked loss feeds replicated hidden states; with loss parallel the logits stay
        # vocab-sharded and cross-entropy reduces across tp without gathering them.
        "output": ColwiseParallel(
            input_layouts=Replicate(),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }


def decoder_layer_plan() -> dict:
    """One transformer block: column-parallel in, row-parallel out, SP norms between."""
    return {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
    }


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, layer_plan: dict, loss_parallel: bool) -> None:
    tied = model.output.weight is model.tok_embeddings.weight
    parallelize_module(model, tp_mesh, decoder_top_plan(loss_parallel))
    if tied:  # both are Shard(0) over the vocab: one DTensor parameter serves both again
        model.output.weight = model.tok_embeddings.weight
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, layer_plan)


def loss_parallel_context(enabled: bool):
    """Around a step's forward and backward: the loss reduces over vocab-sharded logits."""
    return loss_parallel() if enabled else contextlib.nullcontext()
