"""torch.compile per transformer block: blocks are identical, so one compiled graph is reused."""

import torch
from torch import nn


def apply_compile(model: nn.Module) -> None:
    for name, block in model.layers.named_children():
        model.layers.register_module(name, torch.compile(block, fullgraph=True))
