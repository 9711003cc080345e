"""The one entry point: job config -> checks -> mesh -> model -> parallelize -> train loop.

    python train.py --job.config_file train_configs/debug.toml
    torchrun --nproc_per_node 8 train.py --job.config_file train_configs/debug.toml \
        --parallelism.data_parallel_shard_degree 2 --parallelism.tensor_parallel_degree 2 \
        --parallelism.context_parallel_degree 2
"""

import sys

import torch
import torch.distributed as dist
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.distributed.utils import clip_grad_norm_

from components.build import (build_model, init_distributed, log, loss_context, padded_seq_len, row_length,
                              run_command, shard_for_cp, validate)
from components.checkpoint import Checkpointer, weight_source
from components.config import JobConfig, parse_config
from components.metrics import MetricsLogger
from models.common.loss import IGNORE_INDEX
from parallelisms.parallel_dims import ParallelDims
from recipes.data import StepLoader


def token_means(metric_sums: dict[str, torch.Tensor], n_tokens: torch.Tensor, group) -> dict[str, float]:
    """A recipe's per-token metric sums on this rank -> means over the global batch's labelled tokens."""
    if not metric_sums:
        return {}
    sums = torch.stack(list(metric_sums.values())).float()
    dist.all_reduce(sums, group=group)
    return dict(zip(metric_sums, (sums / n_tokens.clamp(min=1)).tolist()))


def train_step(model, recipe, microbatches, parallel_dims, optimizers, lr_schedulers, job_config, device):
    """One optimizer step over this rank's micro-batches. Returns the global batch's loss, grad norm,
    labelled-token count and the recipe's metrics (token means, e.g. a policy's clip fraction)."""
    dp_cp = parallel_dims.mesh("dp_cp").get_group()
    optimizers.zero_grad()  # here, not after the step: the last step's gradients stay inspectable
    microbatches = [shard_for_cp({k: v.to(device) for k, v in mb.items()}, parallel_dims) for mb in microbatches]
    # Normalize by the GLOBAL count of labelled tokens (all micro-batches, dp and cp ranks), so
    # every layout computes the same mean loss and the same gradient as one process.
    n_tokens = sum((mb["labels"] != IGNORE_INDEX).sum() for mb in microbatches).float()
    dist.all_reduce(n_tokens, group=dp_cp)
    total = torch.zeros((), device=device)
    metric_sums = {}
    for mb in microbatches:
        with loss_context(parallel_dims, job_config):  # also covers backward
            loss_sum, recipe_sums = recipe.loss_sum(model, mb)
            loss = loss_sum / n_tokens.clamp(min=1)
            loss.backward()
        total += loss.detach()
        for name, value in recipe_sums.items():
            metric_sums[name] = metric_sums.get(name, 0) + value.detach()
    # Gradients are DTensors sharded over dp_shard x cp (FSDP) and tp: the norm reduces over every
    # one of those mesh dims, so it is the one-process norm (not 1/sqrt(cp) of it).
    grad_norm = clip_grad_norm_(model.parameters(), job_config.training.max_norm)
    optimizers.step()
    lr_schedulers.step()
    dist.all_reduce(total, group=dp_cp)  # tp ranks already hold the same value
    return total.item(), grad_norm.item(), int(n_tokens.item()), token_means(metric_sums, n_tokens, dp_cp)


def train(job_config: JobConfig, spec, model_args, parallel_dims: ParallelDims, recipe, device):
    """Build model, optimizer, schedule and data; run the loop. Returns (model, logged records).
    Needs an initialized process group; leaves it alive (tests run several layouts in one group)."""
    log(f"{spec.name} {job_config.model.flavor}: {model_args.num_params() / 1e6:.1f}M params; "
        f"dp_replicate={parallel_dims.dp_replicate} dp_shard={parallel_dims.dp_shard} cp={parallel_dims.cp} tp={parallel_dims.tp}")
    source = weight_source(job_config)  # decided once: the run's own step, an initial load or a seed
    model = build_model(spec, model_args, parallel_dims, job_config, device, source)
    optimizers = build_optimizers([model], job_config.optimizer, parallel_dims)
    lr_schedulers = build_lr_schedulers(optimizers, job_config.lr_scheduler, job_config.training.steps)

    training = job_config.training
    padded_len = padded_seq_len(training.seq_len, parallel_dims)
    global_batch = training.global_batch_size if training.global_batch_size > 0 else training.local_batch_size * parallel_dims.dp
    loader = StepLoader(recipe.build_stream(padded_len), training.local_batch_size, global_batch,
                        parallel_dims.dp, parallel_dims.mesh("dp").get_local_rank())
    metrics = MetricsLogger(job_config, device, model_args, padded_len, training.steps, dist.get_rank())
    checkpointer = Checkpointer(job_config, model, optimizers, lr_schedulers, loader, spec, model_args, source)
    start = checkpointer.resume()  # the last step the run's own checkpoint holds; 0 on a fresh start
    records = []
    try:
        for step in range(start + 1, training.steps + 1):
            seq_len, padded_len = row_length(training, step, parallel_dims)  # this step's stage of seq_len_schedule
            loader.set_row_len(seq_len, padded_len)
            metrics.flops_per_token = model_args.flops_per_token(padded_len)
            loss, grad_norm, n_tokens, recipe_metrics = train_step(
                model, recipe, loader.next_step(), parallel_dims, optimizers, lr_schedulers, job_config, device
            )
            if step % job_config.metrics.log_freq == 0 or step in (1, training.steps):
                records.append(metrics.log(step, loss, grad_norm, lr_schedulers.schedulers[0].get_last_lr()[0],
                                           global_batch * padded_len, valid_tokens=n_tokens, **recipe_metrics))
            checkpointer.save(step, last_step=step == training.steps)
    finally:
        loader.close()
        metrics.close()
        checkpointer.close()
    return model, records


def main(argv: list[str]) -> None:
    job_config = parse_config(argv)
    spec, model_args, parallel_dims, recipe = validate(job_config)
    device = init_distributed(job_config)
    if job_config.debug.deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        train(job_config, spec, model_args, parallel_dims, recipe, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_command(main, sys.argv[1:])
