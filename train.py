"""The one entry point: job config -> checks -> mesh -> model -> parallelize -> train loop.

    python train.py --job.config_file train_configs/debug.toml
    torchrun --nproc_per_node 8 train.py --job.config_file train_configs/debug.toml \
        --parallelism.data_parallel_shard_degree 2 --parallelism.tensor_parallel_degree 2 \
        --parallelism.context_parallel_degree 2
"""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.distributed.utils import clip_grad_norm_

from components.checkpoint import CheckpointError, load_hf_weights
from components.config import ConfigError, JobConfig, parse_config
from components.metrics import MetricsLogger
from models import get_model_spec
from models.common.decoder import Decoder
from parallelisms.parallel_dims import ParallelDims
from parallelisms.ulysses import slice_for_cp
from recipes import build_recipe
from recipes.data import DataError, StepLoader


def validate(job_config: JobConfig):
    """Everything that can be refused before a process group exists: config, layout, heads, data."""
    spec = get_model_spec(job_config.model.name)
    model_args = spec.args_for(job_config.model.flavor)
    p = job_config.parallelism
    parallel_dims = ParallelDims(
        dp_replicate=p.data_parallel_replicate_degree,
        dp_shard=p.data_parallel_shard_degree,
        cp=p.context_parallel_degree,
        tp=p.tensor_parallel_degree,
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )
    parallel_dims.validate_heads(model_args.n_heads, model_args.n_kv_heads)
    if p.pipeline_parallel_degree != 1 or p.expert_parallel_degree != 1:
        raise ConfigError("pipeline and expert parallel are not supported; use dp_replicate, dp_shard, cp and tp")
    recipe = build_recipe(job_config)
    if recipe.vocab_size > model_args.vocab_size:
        raise ConfigError(f"tokenizer vocab {recipe.vocab_size} exceeds the model's vocab_size {model_args.vocab_size}")
    return spec, model_args, parallel_dims, recipe


def init_distributed(job_config: JobConfig) -> torch.device:
    """NCCL on GPUs, gloo on CPU; also a 1-process group so one code path serves every layout."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=job_config.comm.init_timeout_seconds))
    return device


def build_model(spec, model_args, parallel_dims: ParallelDims, job_config: JobConfig, device) -> Decoder:
    """On the meta device first, so no rank ever holds the unsharded model; then shard and fill."""
    with torch.device("meta"):
        model = Decoder(model_args)
    spec.parallelize_fn(model, parallel_dims, job_config)
    model.to_empty(device=device)
    ckpt = job_config.checkpoint
    if ckpt.initial_load_path:
        if not ckpt.initial_load_in_hf:
            raise ConfigError("checkpoint.initial_load_path without initial_load_in_hf = true is not supported yet")
        load_hf_weights(model, spec.state_dict_adapter(model_args), ckpt.initial_load_path)
        log(f"initialized from Hugging Face weights at {ckpt.initial_load_path}")
    else:
        torch.manual_seed(job_config.debug.seed or 0)
        model.init_weights()
        log("initialized randomly")
    model.train()
    return model


def shard_for_cp(batch: dict, parallel_dims: ParallelDims) -> dict:
    """Contiguous sequence chunks per cp rank. document_ids stay global: attention runs over the
    full sequence after the Ulysses exchange."""
    cp_rank = parallel_dims.mesh("cp").get_local_rank()
    return {k: v if k == "document_ids" else slice_for_cp(v, cp_rank, parallel_dims.cp) for k, v in batch.items()}


def train_step(model, recipe, microbatches, parallel_dims, optimizers, lr_schedulers, job_config, device):
    """One optimizer step over this rank's micro-batches. Returns (loss, grad_norm) of the global batch."""
    dp_cp = parallel_dims.mesh("dp_cp").get_group()
    microbatches = [shard_for_cp({k: v.to(device) for k, v in mb.items()}, parallel_dims) for mb in microbatches]
    # Normalize by the GLOBAL count of labelled tokens (all micro-batches, dp and cp ranks), so
    # every layout computes the same mean loss and the same gradient as one process.
    n_tokens = sum((mb["labels"] != -100).sum() for mb in microbatches).float()
    dist.all_reduce(n_tokens, group=dp_cp)
    use_loss_parallel = parallel_dims.tp > 1 and not job_config.parallelism.disable_loss_parallel
    total = torch.zeros((), device=device)
    for mb in microbatches:
        with loss_parallel() if use_loss_parallel else torch.enable_grad():  # also covers backward
            loss_sum, _ = recipe.loss_sum(model, mb)
            loss = loss_sum / n_tokens.clamp(min=1)
            loss.backward()
        total += loss.detach()
    grad_norm = clip_grad_norm_(model.parameters(), job_config.training.max_norm)
    optimizers.step()
    lr_schedulers.step()
    optimizers.zero_grad()
    dist.all_reduce(total, group=dp_cp)  # tp ranks already hold the same value
    return total.item(), grad_norm.item(), int(n_tokens.item())


def log(message: str) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(message, flush=True)


def train(job_config: JobConfig, spec, model_args, parallel_dims: ParallelDims, recipe, device):
    """Build model, optimizer, schedule and data; run the loop. Returns (model, logged records).
    Needs an initialized process group; leaves it alive (tests run several layouts in one group)."""
    log(f"{spec.name} {job_config.model.flavor}: {model_args.num_params() / 1e6:.1f}M params; "
        f"dp_replicate={parallel_dims.dp_replicate} dp_shard={parallel_dims.dp_shard} cp={parallel_dims.cp} tp={parallel_dims.tp}")
    model = build_model(spec, model_args, parallel_dims, job_config, device)
    optimizers = build_optimizers([model], job_config.optimizer, parallel_dims)
    lr_schedulers = build_lr_schedulers(optimizers, job_config.lr_scheduler, job_config.training.steps)

    training = job_config.training
    multiple = parallel_dims.tp * parallel_dims.cp  # sequence parallel and Ulysses need equal chunks
    padded_len = -(-training.seq_len // multiple) * multiple
    global_batch = training.global_batch_size if training.global_batch_size > 0 else training.local_batch_size * parallel_dims.dp
    loader = StepLoader(recipe.build_stream(padded_len), training.local_batch_size, global_batch,
                        parallel_dims.dp, parallel_dims.mesh("dp").get_local_rank())
    metrics = MetricsLogger(job_config, device, model_args.flops_per_token(padded_len), training.steps, dist.get_rank())
    records = []
    try:
        for step in range(1, training.steps + 1):
            loss, grad_norm, n_tokens = train_step(
                model, recipe, loader.next_step(), parallel_dims, optimizers, lr_schedulers, job_config, device
            )
            if step % job_config.metrics.log_freq == 0 or step in (1, training.steps):
                records.append(metrics.log(step, loss, grad_norm, lr_schedulers.schedulers[0].get_last_lr()[0],
                                           global_batch * padded_len, valid_tokens=n_tokens))
    finally:
        metrics.close()
    return model, records


def main(argv: list[str]) -> None:
    job_config = parse_config(argv)
    try:
        spec, model_args, parallel_dims, recipe = validate(job_config)
    except ValueError as e:  # ParallelDims / ModelSpec / DecoderArgs refusals
        raise ConfigError(str(e)) from None
    device = init_distributed(job_config)
    if job_config.debug.deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        train(job_config, spec, model_args, parallel_dims, recipe, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
