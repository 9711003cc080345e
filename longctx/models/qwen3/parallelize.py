from torch import nn
from torch.distributed.tensor.parallel import SequenceParallel

from longctx.models.common.parallelize import parallelize_decoder
from longctx.parallelisms.parallel_dims import ParallelDims
from longctx.parallelisms.settings import ModelSettings
from longctx.parallelisms.tensor_parallel import decoder_layer_plan


def qwen3_layer_plan() -> dict:
    # q/k norms act per head on head-sharded activations: their (replicated) weights must see the
    # input as sharded on the head dim, or their gradients are silently wrong (docs/design.md, traps).
    per_head_norm = SequenceParallel(sequence_dim=2, use_local_output=True)
    return decoder_layer_plan() | {"attention.q_norm": per_head_norm, "attention.k_norm": per_head_norm}


def parallelize_qwen3(model: nn.Module, parallel_dims: ParallelDims, settings: ModelSettings) -> nn.Module:
    return parallelize_decoder(model, parallel_dims, settings, qwen3_layer_plan())
