"""Activation checkpointing of transformer blocks: none, full, or selective (every N-th block)."""

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

AC_MODES = ("none", "full", "selective")


def blocks_to_checkpoint(mode: str, selective_option: str, n_layers: int) -> list[int]:
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpoint.mode={mode!r}; choose one of {AC_MODES}")
    if mode == "none":
        return []
    if mode == "full":
        return list(range(n_layers))
    if not selective_option.isdigit() or int(selective_option) < 1:
        raise ValueError(
            f"activation_checkpoint.selective_ac_option={selective_option!r}; give N >= 1 to checkpoint every N-th block"
        )
    every = int(selective_option)
    return [i for i in range(n_layers) if i % every == 0]


def apply_ac(model: nn.Module, mode: str, selective_option: str) -> None:
    """Wrap blocks in checkpoint_wrapper. Call AFTER compile: wrapping first and then compiling
    fails under tensor parallel (DeviceMesh in saved tensors, DESIGN.md); wrapping the compiled
    block recomputes the compiled forward in backward and works with every parallelism."""
    for i in blocks_to_checkpoint(mode, selective_option, len(model.layers)):
        name = str(i)
        model.layers.register_module(name, checkpoint_wrapper(model.layers[name], preserve_rng_state=False))
