from torch import nn

from longctx.models.common.parallelize import parallelize_decoder
from longctx.parallelisms.parallel_dims import ParallelDims
from longctx.parallelisms.settings import ModelSettings
from longctx.parallelisms.tensor_parallel import decoder_layer_plan


def parallelize_qwen2(model: nn.Module, parallel_dims: ParallelDims, settings: ModelSettings) -> nn.Module:
    # The q/k/v biases need no rows of their own: ColwiseParallel shards a bias with its weight.
    return parallelize_decoder(model, parallel_dims, settings, decoder_layer_plan())
