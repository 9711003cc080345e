"""How a decoder is wrapped and run, decided once per job and handed to everyone who needs it.

`launch.validate` derives the settings from the job config (or, with activation_checkpoint.mode =
"auto", lets the planner choose them: planner/auto.py); `parallelize_fn` wraps the model with
them, the training step runs under `loss_context` and `forward_context` (loss parallel, autocast) and the planner
adds up their cost. None of them changes a number the model computes beyond bf16 rounding.
"""

import contextlib
from dataclasses import dataclass

import torch
from torch.distributed.tensor.parallel import loss_parallel

# What one transformer block keeps for backward:
#   "none"  everything (nothing recomputed)
#   "op"    its input, the attention output and log-sum-exp, the cp collectives' outputs: backward
#           recomputes everything but the attention kernel and the communication
#   "full"  its input only: backward recomputes the whole block
BLOCK_MODES = ("none", "op", "full")


@dataclass(frozen=True)
class ModelSettings:
    checkpointing: tuple[str, ...]  # one of BLOCK_MODES per block, in block order
    compile: bool = False
    compile_backend: str = "inductor"
    mlp_chunk: int = 0  # tokens per tile of the tiled SwiGLU; 0: whole
    activation_offload: bool = False  # checkpointed block inputs parked in pinned host memory
    attention_groups: int = 1  # attention (and its backward) runs over this many groups of kv heads
    compute_dtype: torch.dtype = torch.float32  # matmuls and activations; weights stay fp32 (master)
    # FSDP2 wraps the blocks (its mixed precision casts the weights to compute_dtype). Without it
    # (one rank, no tensor parallel, weights on the device) the step runs under autocast instead:
    # the same bf16 compute without FSDP's casts and copies on a mesh of one.
    fsdp: bool = True
    reshard_after_forward: bool = True  # FSDP: False keeps each block's gathered weights until backward
    cpu_offload: bool = False  # FSDP: fp32 weights, gradients and AdamW state in host memory
    loss_parallel: bool = False  # tensor parallel: the loss reduces over vocab-sharded logits
    loss_chunk: int = 4096  # tokens per cross-entropy chunk: one chunk's logits exist at a time

    def __post_init__(self):
        unknown = set(self.checkpointing) - set(BLOCK_MODES)
        if unknown:
            raise ValueError(f"block checkpointing modes {sorted(unknown)} are not among {BLOCK_MODES}")

    @property
    def autocast(self) -> bool:
        return not self.fsdp and self.compute_dtype != torch.float32

    def describe(self) -> str:
        """One line for the start of a run: what every block keeps, and the memory features on."""
        counts = [f"{mode} x{self.checkpointing.count(mode)}" for mode in BLOCK_MODES if mode in self.checkpointing]
        features = [f"mlp tiles of {self.mlp_chunk}" if self.mlp_chunk else "",
                    "activation offload" if self.activation_offload else "",
                    f"attention in {self.attention_groups} kv-head groups" if self.attention_groups > 1 else "",
                    f"loss in chunks of {self.loss_chunk}",
                    "fp32 state on host" if self.cpu_offload else "",
                    ("FSDP" + (", reshard after forward" if self.reshard_after_forward else ", no reshard")) if self.fsdp
                    else f"no FSDP, autocast to {str(self.compute_dtype).removeprefix('torch.')}" if self.autocast else "no FSDP"]
        return f"checkpointing {', '.join(counts)}; " + "; ".join(f for f in features if f)


def loss_context(settings: ModelSettings):
    """Around a micro-batch's forward AND backward: under tensor parallel the loss reduces over
    vocab-sharded logits, in both directions."""
    return loss_parallel() if settings.loss_parallel else contextlib.nullcontext()


def forward_context(settings: ModelSettings, device_type: str):
    """Around a forward only: autocast when the settings compute in bf16 without FSDP. Backward
    takes the dtypes forward chose (custom autograd functions restore forward's autocast state
    with torch.amp.custom_bwd), as autocast's own guidance has it."""
    if settings.autocast:
        return torch.autocast(device_type, dtype=settings.compute_dtype)
    return contextlib.nullcontext()
