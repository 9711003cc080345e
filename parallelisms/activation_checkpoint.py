"""Activation checkpointing of transformer blocks.

- "full": every block keeps only its input and recomputes the rest in backward.
- "selective" with N: every N-th block as in "full", the others keep everything.
- "selective" with "op": every block recomputes everything EXCEPT the attention kernel and the
  context-parallel collectives (all-to-alls, K/V all-gather), whose outputs it keeps. Backward then repeats neither the
  O(T^2) kernel nor any communication, for T x (H x D + H) more values per block than "full"
  (attention output and log-sum-exp): the long-context setting whenever that memory fits.
"""

import functools

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

AC_MODES = ("none", "full", "selective")

# Ops whose outputs "op" keeps. A kernel missing here is recomputed: slower, still correct.
_KEEP_OPS = {
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.higher_order.flex_attention,
    torch.ops._c10d_functional.all_to_all_single.default,
    torch.ops._c10d_functional.all_gather_into_tensor.default,  # K/V of the sequence-sharded cp
}


def is_per_op(mode: str, selective_option: str) -> bool:
    return mode == "selective" and selective_option == "op"


def blocks_to_checkpoint(mode: str, selective_option: str, n_layers: int) -> list[int]:
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpoint.mode={mode!r}; choose one of {AC_MODES}")
    if mode == "none":
        return []
    if mode == "full" or is_per_op(mode, selective_option):
        return list(range(n_layers))
    if not selective_option.isdigit() or int(selective_option) < 1:
        raise ValueError(
            f"activation_checkpoint.selective_ac_option={selective_option!r}; "
            f"give N >= 1 to checkpoint every N-th block, or 'op' to keep only attention outputs"
        )
    every = int(selective_option)
    return [i for i in range(n_layers) if i % every == 0]


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEEP_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: nn.Module, mode: str, selective_option: str) -> None:
    """Wrap blocks in checkpoint_wrapper. Whole-block modes wrap compiled blocks (wrapping first
    and then compiling fails under tensor parallel: DeviceMesh in saved tensors, docs/design.md);
    "op" must be wrapped BEFORE compile, because under compile the partitioner applies its
    policy (a compiled block's recompute would bypass it)."""
    policy = {}
    if is_per_op(mode, selective_option):
        policy["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_attention)
    for i in blocks_to_checkpoint(mode, selective_option, len(model.layers)):
        name = str(i)
        model.layers.register_module(name, checkpoint_wrapper(model.layers[name], preserve_rng_state=False, **policy))
