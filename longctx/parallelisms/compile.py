"""torch.compile per transformer block: blocks are identical, so one compiled graph is reused."""

from torch import nn


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    # Module.compile() compiles in place instead of wrapping in an OptimizedModule: parameter
    # names gain no `_orig_mod.`, which torch's DCP state-dict helpers do not strip beneath a
    # checkpoint wrapper (loading a compiled + checkpointed model failed on missing keys).
    # dynamic=False: a new row length (a stage of training.seq_len_schedule) compiles once more at
    # static shapes; by default dynamo would recompile the second length with symbolic shapes.
    for block in model.layers.values():
        block.compile(backend=backend, fullgraph=True, dynamic=False)
