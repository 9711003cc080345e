"""Activation checkpointing, per transformer block (parallelisms/settings.py BLOCK_MODES), activation
offload and the tiled MLP.

- "full": the block keeps only its input and recomputes the rest in backward.
- "op": the block recomputes everything EXCEPT the attention kernel and the context-parallel
  collectives (all-to-alls, K/V all-gather), whose outputs it keeps. Backward then repeats neither
  the O(T^2) kernel nor any communication, for T x (H x D + H) more values per block than "full"
  (attention output and log-sum-exp): the long-context setting whenever that memory fits.
- "none": the block keeps everything.
The config's activation_checkpoint.mode gives every block the same mode (or every N-th "full");
"auto" lets the planner mix them (planner/auto.py).
"""

import contextlib
import functools
import weakref

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from longctx.base import ConfigError

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


def block_checkpointing(mode: str, selective_option: str, n_layers: int) -> tuple[str, ...]:
    """activation_checkpoint.mode and selective_ac_option as one mode per block (settings.BLOCK_MODES):
    "none", "full", "selective" with "op" (every block "op") or with N (every N-th block "full",
    the others "none")."""
    if mode not in AC_MODES:
        raise ConfigError(f"activation_checkpoint.mode={mode!r}; choose one of {AC_MODES}")
    if mode != "selective":
        return (mode,) * n_layers
    if selective_option == "op":
        return ("op",) * n_layers
    if not selective_option.isdigit() or int(selective_option) < 1:
        raise ConfigError(
            f"activation_checkpoint.selective_ac_option={selective_option!r}; "
            f"give N >= 1 to checkpoint every N-th block, or 'op' to keep only attention outputs"
        )
    every = int(selective_option)
    return tuple("full" if i % every == 0 else "none" for i in range(n_layers))


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEEP_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: nn.Module, checkpointing: tuple[str, ...], modes: tuple[str, ...]) -> None:
    """Wrap the blocks whose mode is in `modes` in checkpoint_wrapper ("op" with its selective
    policy). parallelize_decoder calls it twice: "op" blocks BEFORE compile, because under compile
    the partitioner applies their policy (a compiled block's own recompute would bypass it); "full"
    blocks AFTER compile, because wrapping first and then compiling fails under tensor parallel
    (DeviceMesh in saved tensors, docs/design.md)."""
    per_op = functools.partial(create_selective_checkpoint_contexts, _keep_attention)
    for i, mode in enumerate(checkpointing):
        if mode in modes:
            name = str(i)
            policy = {"context_fn": per_op} if mode == "op" else {}
            model.layers.register_module(name, checkpoint_wrapper(model.layers[name], preserve_rng_state=False, **policy))


class _HostCopy:
    """One saved tensor parked in host memory; `reload` brings it back to its device.

    On CUDA the copies run on a side stream: device -> host right after the block's forward
    (`record_stream` keeps the device memory from being reused before the copy has read it),
    host -> device one block ahead in backward. Pinned host memory comes from torch's caching
    host allocator, so after the first step no step pays for cudaHostAlloc. On CPU the "host
    copy" is a plain clone: the same path runs, which is what the CPU tests check."""

    def __init__(self, tensor: torch.Tensor, stream):
        self.device, self.stream, self.reloaded, self.ready = tensor.device, stream, None, None
        self.host = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device="cpu",
                                        pin_memory=stream is not None)
        if stream is None:
            self.host.copy_(tensor)
            return
        stream.wait_stream(torch.cuda.current_stream(self.device))  # the tensor is written by now
        with torch.cuda.stream(stream):
            self.host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)

    def prefetch(self) -> None:
        if self.reloaded is not None or self.stream is None:
            return
        # Allocated on the compute stream, which later uses it; the copy waits for that stream's
        # earlier work, since the allocator may hand out memory a queued kernel still reads.
        self.reloaded = torch.empty_strided(self.host.size(), self.host.stride(), dtype=self.host.dtype, device=self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.reloaded.copy_(self.host, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(self.stream)

    def reload(self) -> torch.Tensor:
        if self.stream is None:
            return self.host.clone()
        self.prefetch()  # no-op when the block above already started it
        torch.cuda.current_stream(self.device).wait_event(self.ready)
        tensor, self.reloaded = self.reloaded, None
        return tensor


class ActivationOffload:
    """Saved-tensor hooks that park each checkpointed block's input in host memory.

    A checkpointed block keeps only its input (plus, under "op", the attention outputs, which
    stay on the device); over L blocks these inputs are L x T x dim values, the largest term of
    activation memory at long context. Entered around the block call, the hooks see exactly the
    tensors the block saves for backward and move those that are its input (ALST, Bekman et al.
    2025, arXiv:2506.13996, offloads the same tensor; the hooks are torch's
    `torch.autograd.graph.save_on_cpu` mechanism, with a side stream and one block of prefetch).
    Backward visits blocks in reverse; reloading block i's input starts block i-1's copy, so it
    overlaps block i's recompute and backward. Cost: one extra block input on the device, and
    host memory (pinned) for all of them."""

    def __init__(self):
        self.stream = None  # created lazily on the device of the first tensor
        self.pending: list[weakref.ref] = []  # saved inputs of this step, in forward order

    @contextlib.contextmanager
    def saving(self, block_input: torch.Tensor):
        # Autograd keeps the hooks with every tensor they packed: a pack hook that closed over the
        # block input itself would keep it on the device for the whole step, the very memory this
        # frees. Only its address is kept.
        input_ptr = block_input.data_ptr()

        def pack(tensor):
            if tensor.data_ptr() != input_ptr:
                return tensor  # rope tables, masks, "op"'s attention outputs: left where they are
            if tensor.is_cuda and self.stream is None:
                self.stream = torch.cuda.Stream(tensor.device)
            copy = _HostCopy(tensor, self.stream if tensor.is_cuda else None)
            self.pending = [ref for ref in self.pending if ref() is not None] + [weakref.ref(copy)]
            return copy

        with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
            yield

    def _unpack(self, packed):
        if not isinstance(packed, _HostCopy):
            return packed
        live = [ref() for ref in self.pending]
        if packed in live:
            index = live.index(packed)
            if index > 0 and live[index - 1] is not None:
                live[index - 1].prefetch()  # the block backward visits next
            del self.pending[index]
        return packed.reload()


@functools.cache
def _offloading_class(cls: type) -> type:
    # The hooks must be entered outside torch.compile (dynamo does not trace saved-tensor hooks),
    # and the block keeps its name in the state dict, so the class is swapped rather than the
    # block wrapped (as fully_shard does); __call__ wraps the whole, possibly compiled, call.
    def __call__(self, x, *args, **kwargs):
        with self._activation_offload.saving(x):
            return cls.__call__(self, x, *args, **kwargs)

    return type(f"Offloaded{cls.__name__}", (cls,), {"__call__": __call__})


def apply_activation_offload(model: nn.Module, checkpointing: tuple[str, ...]) -> None:
    """Park the inputs of the checkpointed blocks in host memory (after apply_ac and compile)."""
    offload = ActivationOffload()
    for i, mode in enumerate(checkpointing):
        if mode == "none":
            continue
        block = model.layers[str(i)]
        block._activation_offload = offload
        block.__class__ = _offloading_class(type(block))


def apply_mlp_tiling(model: nn.Module, chunk_size: int) -> None:
    """Run every block's MLP over sequence tiles of chunk_size tokens (models/common/decoder.py)."""
    for block in model.layers.values():
        block.feed_forward.chunk_size = chunk_size
