"""The optimizer and its learning-rate schedule, over torch.optim, with torchtitan 0.2.2's
semantics (torchtitan/components/optimizer.py and lr_scheduler.py), so its TOML sections mean the
same here: [optimizer] name, lr, beta1, beta2, eps, weight_decay, implementation; [lr_scheduler]
warmup_steps, total_steps, decay_ratio, decay_type, min_lr_factor.

One optimizer over the whole model and one schedule (torchtitan keeps a list of each, one per
pipeline stage; there are no stages here)."""

import functools
import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from longctx.base import log

# The job config refuses other names and choices before any work starts.
OPTIMIZERS = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
# torch's three code paths for the same update: one fused kernel per step, multi-tensor ops, or a
# Python loop over parameters. Only "fused" honours found_inf (train.skips_on_device).
IMPLEMENTATIONS = {"fused": dict(fused=True, foreach=False), "foreach": dict(fused=False, foreach=True),
                   "for-loop": dict(fused=False, foreach=False)}


def clip_grad_norm_(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients so their global 2-norm is at most max_norm; returns the norm before.

    Gradients are DTensors sharded over dp_shard x cp (FSDP) and tp: torch's norm of them is a
    partial norm that full_tensor() reduces over every one of those mesh dims, so it is the
    one-process norm (not 1/sqrt(cp) of it). No pipeline stages here, so nothing is reduced beyond
    the mesh (torchtitan's clip_grad_norm_ adds that)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def build_optimizer(model: nn.Module, optimizer_config) -> torch.optim.Optimizer:
    """Adam or AdamW over the model's trainable parameters."""
    config = optimizer_config
    params = [p for p in model.parameters() if p.requires_grad]
    return OPTIMIZERS[config.name](params, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                                   weight_decay=config.weight_decay, **IMPLEMENTATIONS[config.implementation])


def build_lr_schedule(optimizer: torch.optim.Optimizer, lr_scheduler_config, training_steps: int) -> LambdaLR:
    """Linear warmup, a stable stretch, then a decay over the last `decay_ratio` of the steps (all
    the steps after warmup when it is unset).

    A LambdaLR: `last_epoch` counts the steps applied. A checkpoint holds that count and the base
    lr, not the curve: a resumed run follows this run's [lr_scheduler] and training.steps from the
    saved step on, at the saved run's optimizer.lr."""
    config = lr_scheduler_config
    total = config.total_steps if config.total_steps is not None else training_steps
    warmup = int(config.warmup_steps)
    if warmup > total:
        log(f"lr_scheduler.warmup_steps={warmup} exceeds the {total} steps of the schedule: warming up over {total}")
        warmup = total
    decay = total - warmup if config.decay_ratio is None else round(total * config.decay_ratio)
    if warmup + decay > total:
        log(f"lr_scheduler: warmup ({warmup}) + decay ({decay}) steps exceed the {total} steps of the schedule: "
            f"decaying over {total - warmup}")
        decay = total - warmup
    # torchtitan adds a virtual last step to the stable stretch, so the last step's lr is not 0.
    stable = total + 1 - warmup - decay
    # A partial, as in torchtitan: LambdaLR saves its (empty) __dict__, so checkpoints keep
    # torchtitan's keys and those of earlier versions resume.
    return LambdaLR(optimizer, functools.partial(warmup_stable_decay, warmup=warmup, stable=stable, decay=decay,
                                                 decay_type=config.decay_type, min_lr_factor=config.min_lr_factor))


def warmup_stable_decay(step: int, warmup: int, stable: int, decay: int, decay_type: str, min_lr_factor: float) -> float:
    """The multiple of optimizer.lr at 0-based step `step`."""
    if step < warmup:
        return (step + 1) / warmup
    if step < warmup + stable or decay == 0:
        return 1.0
    # Past the schedule's end (training.steps raised beyond lr_scheduler.total_steps) the lr stays
    # at its last value; torchtitan would extrapolate the curve (below min_lr_factor, or back up a
    # cosine).
    progress = min((step + 1 - warmup - stable) / decay, 1.0)
    if decay_type == "linear":
        remaining = 1 - progress
    elif decay_type == "sqrt":
        remaining = 1 - math.sqrt(progress)
    else:
        remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_factor + (1 - min_lr_factor) * remaining
