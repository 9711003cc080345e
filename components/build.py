"""What train.py and the scripts share: checks before any process group, the process group,
the model built on meta and parallelized, and the per-step context of a batch.

Scripts (conversion, log-probs, bench) import these instead of train.py, which only wires them
into the training loop."""

import contextlib
import dataclasses
import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel

from components import profiling, validation
from components.checkpoint import WeightSource, check_dcp_checkpoint, load_dcp_model, weight_source
from components.config import ConfigError, JobConfig
from components.files import CheckpointError, log
from components.hf import check_hf_config, load_hf_weights
from models import MODELS, get_model_spec
from models.common.args import read_hf_config
from models.common.decoder import Decoder
from models.common.rope import rope_scaling_from_dict
from parallelisms.activation_checkpoint import blocks_to_checkpoint
from parallelisms.parallel_dims import ParallelDims
from parallelisms.context_parallel import slice_for_cp
from recipes import build_recipe
from recipes.data import DataError


def validate(job_config: JobConfig):
    """Everything that can be refused before a process group exists: config, layout, heads, data.
    Every refusal is a ConfigError (or the recipe's DataError): one line for the user."""
    try:
        return _validate(job_config)
    except (ConfigError, DataError):
        raise
    except ValueError as e:  # ParallelDims / ModelSpec / DecoderArgs refusals
        raise ConfigError(str(e)) from None


def model_spec_and_args(job_config: JobConfig):
    """The family's ModelSpec and the flavor's DecoderArgs; a bad name, flavor or config.json is a ConfigError."""
    try:
        spec = get_model_spec(job_config.model.name)
        args = spec.args_for(job_config.model.flavor)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if job_config.model.rope_scaling is None:
        return spec, args
    try:  # the TOML's scaling replaces config.json's, in this job's copy of the args
        scaling = rope_scaling_from_dict(job_config.model.rope_scaling, args.max_seq_len)
    except ValueError as e:
        raise ConfigError(f"model.rope_scaling: {e}") from None
    return spec, dataclasses.replace(args, rope_scaling=scaling)


def hf_folder_args(hf_dir: str) -> list[str]:
    """Job-config arguments that make the Hugging Face folder hf_dir the model (family from its
    config.json, dimensions, tokenizer) and its initial weights."""
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ConfigError(f"{hf_dir!r} has no config.json; point at a Hugging Face model folder")
    try:
        family = read_hf_config(hf_dir).get("model_type")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if family not in MODELS:
        raise ConfigError(f"{hf_dir}/config.json: model_type={family!r} is not supported; supported: {', '.join(sorted(MODELS))}")
    return ["--model.name", family, "--model.flavor", hf_dir, "--model.hf_assets_path", hf_dir,
            "--checkpoint.initial_load_path", hf_dir, "--checkpoint.initial_load_in_hf"]


def _validate(job_config: JobConfig):
    spec, model_args = model_spec_and_args(job_config)
    p = job_config.parallelism
    parallel_dims = ParallelDims(
        dp_replicate=p.data_parallel_replicate_degree,
        dp_shard=p.data_parallel_shard_degree,
        cp=p.context_parallel_degree,
        tp=p.tensor_parallel_degree,
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        cp_ulysses=p.context_parallel_ulysses_degree,
    ).for_heads(model_args.n_heads, model_args.n_kv_heads)
    check_seq_len_schedule(job_config.training, job_config.compile.enable)
    ac = job_config.activation_checkpoint
    blocks_to_checkpoint(ac.mode, ac.selective_ac_option, model_args.n_layers)  # refuses a bad mode or option
    if ac.cpu_offload and ac.mode == "none":
        raise ConfigError("activation_checkpoint.cpu_offload parks checkpointed block inputs; set activation_checkpoint.mode full or selective")
    if ac.mlp_chunk_size < 0 or (ac.mlp_chunk_size and parallel_dims.tp > 1):
        raise ConfigError(f"activation_checkpoint.mlp_chunk_size={ac.mlp_chunk_size}: give 0 (off) or a positive number of "
                          f"tokens, and 0 under tensor parallel (which already splits the MLP's hidden_dim by tp)")
    if job_config.training.skip_nonfinite_steps < 0:
        raise ConfigError(f"training.skip_nonfinite_steps={job_config.training.skip_nonfinite_steps} must be >= 0")
    validation.check(job_config)
    profiling.check(job_config)
    recipe = build_recipe(job_config)
    if recipe.vocab_size > model_args.vocab_size:
        raise ConfigError(f"tokenizer vocab {recipe.vocab_size} exceeds the model's vocab_size {model_args.vocab_size}")
    # Token ids given as numbers in the data (policy rollouts); out of range, one would be a
    # device-side assert at the step that reaches it.
    largest_id, where = getattr(recipe, "largest_token_id", (-1, ""))
    if largest_id >= model_args.vocab_size:
        raise DataError(f"{where}: token id {largest_id} >= the model's vocab_size {model_args.vocab_size}; "
                        "the rollouts were tokenized for another model")
    return spec, model_args, parallel_dims, recipe


def check_seq_len_schedule(training, compiled: bool) -> None:
    """training.seq_len_schedule: [step, seq_len] pairs from step 0 on, ending at training.seq_len's length."""
    schedule = training.seq_len_schedule
    if schedule is None:
        return
    shown = f"training.seq_len_schedule={[list(stage) for stage in schedule]}"
    if not schedule or any(len(stage) != 2 for stage in schedule):
        raise ConfigError(f"{shown} must be a list of [step, seq_len] pairs, e.g. [[0, 32768], [2000, 65536]]")
    starts, lengths = [stage[0] for stage in schedule], [stage[1] for stage in schedule]
    if starts[0] != 0 or any(a >= b for a, b in zip(starts, starts[1:])):
        raise ConfigError(f"{shown}: steps must start at 0 and increase")
    if min(lengths) <= 0 or max(lengths) != training.seq_len:
        raise ConfigError(f"{shown}: lengths must be positive and the largest must equal training.seq_len={training.seq_len}")
    # Each stage compiles each block once at its own static shapes (parallelisms/compile.py); past
    # dynamo's recompile limit a block would silently fall back to eager.
    limit = torch._dynamo.config.recompile_limit
    if compiled and len(schedule) > limit:
        raise ConfigError(f"{shown} has {len(schedule)} stages, more than torch.compile recompiles ({limit}); use fewer stages")


def row_length(training, step: int, parallel_dims: ParallelDims) -> tuple[int, int]:
    """(tokens, padded length) of step's rows (steps count from 1): training.seq_len_schedule's stage,
    else training.seq_len. A function of the step alone, so a resumed run lands in its stage."""
    stages = [length for start, length in training.seq_len_schedule or [] if start <= step]
    seq_len = stages[-1] if stages else training.seq_len
    return seq_len, padded_seq_len(seq_len, parallel_dims)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(job_config: JobConfig) -> torch.device:
    """NCCL on GPUs, gloo on CPU; also a 1-process group so one code path serves every layout.
    With FSDP's CPU offload, collectives on host tensors (gradient norm, checkpoint state) go over
    gloo (torchtitan's choice too)."""
    if "WORLD_SIZE" not in os.environ:  # plain `python train.py`: a 1-process group on a free port
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo" if job_config.training.enable_cpu_offload else "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=job_config.comm.init_timeout_seconds))
    return device


def padded_seq_len(seq_len: int, parallel_dims: ParallelDims) -> int:
    """seq_len rounded up so that every cp and sequence-parallel rank gets equal pieces (the
    padding is masked from the loss)."""
    multiple = parallel_dims.seq_multiple
    return -(-seq_len // multiple) * multiple


def build_model(spec, model_args, parallel_dims: ParallelDims, job_config: JobConfig, device,
                source: WeightSource | None = None) -> Decoder:
    """On the meta device first, so no rank ever holds the unsharded model; then shard and fill
    from `source` (default: the one the job config names, components.checkpoint.weight_source)."""
    with torch.device("meta"):
        model = Decoder(model_args)
    spec.parallelize_fn(model, parallel_dims, job_config)
    # FSDP's CPU offload keeps the sharded fp32 parameters in host memory from the start.
    model.to_empty(device="cpu" if job_config.training.enable_cpu_offload else device)
    load_weights(model, spec, model_args, source or weight_source(job_config))
    model.train()
    return model


def load_weights(model: Decoder, spec, model_args, source: WeightSource) -> None:
    """Fill a materialized model from its weight source, every input checked first; one log line.
    A resumed run's weights are only checked here: Checkpointer.resume reads them with the
    optimizer and the rest of the training state, in one pass over the files."""
    if source.kind == "resume":
        check_dcp_checkpoint(model, source.path)
    elif source.kind == "hf":
        check_hf_config(spec, model_args, source.path)
        load_hf_weights(model, spec.state_dict_adapter(model_args), source.path)
    elif source.kind == "dcp":
        load_dcp_model(model, source.path)
    else:
        model.init_weights(seed=source.seed)
    log(source.log_line())


def shard_for_cp(batch: dict, parallel_dims: ParallelDims) -> dict:
    """This cp rank's tokens of every per-token field, in the head-tail order of the sequence shard
    (parallelisms/context_parallel.py). document_ids stay global: attention builds each query
    chunk's slice of the document mask from them."""
    cp_rank, cp, shard = parallel_dims.mesh("cp").get_local_rank(), parallel_dims.cp, parallel_dims.cp_shard
    return {k: v if k == "document_ids" else slice_for_cp(v, cp_rank, cp, shard) for k, v in batch.items()}


def loss_context(parallel_dims: ParallelDims, job_config: JobConfig):
    """Loss parallel under tp: the loss reduces over vocab-sharded logits (forward and backward)."""
    if parallel_dims.tp > 1 and not job_config.parallelism.disable_loss_parallel:
        return loss_parallel()
    return contextlib.nullcontext()


def run_command(main, argv: list[str]) -> None:
    """main(argv); a refused input exits with code 2 and one `error:` line, said by rank 0 alone
    (every rank finds it). Other exceptions keep their tracebacks."""
    try:
        main(argv)
    except (ConfigError, DataError, CheckpointError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
