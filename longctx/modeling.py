"""The job's model: family and dimensions from the config, built on the meta device, parallelized,
then filled from its weight source. Shared by train.py and every script that runs a model."""

import dataclasses
import os

import torch
import torch.distributed as dist

from longctx.base import ConfigError, log
from longctx.checkpoint.dcp import check_dcp_checkpoint, load_dcp_model
from longctx.checkpoint.hf import check_hf_config, load_hf_weights
from longctx.checkpoint.source import WeightSource, weight_source
from longctx.config import JobConfig
from longctx.models import MODELS, get_model_spec
from longctx.models.common.args import read_hf_config
from longctx.models.common.decoder import Decoder
from longctx.models.common.rope import rope_scaling_from_dict
from longctx.parallelisms.parallel_dims import ParallelDims
from longctx.parallelisms.settings import ModelSettings


def model_spec_and_args(job_config: JobConfig):
    """The family's ModelSpec and the flavor's DecoderArgs; a bad name, flavor or config.json is a ConfigError."""
    spec = get_model_spec(job_config.model.name)
    args = spec.args_for(job_config.model.flavor)
    if job_config.model.rope_scaling is None:
        return spec, args
    try:  # the TOML's scaling replaces config.json's, in this job's copy of the args
        scaling = rope_scaling_from_dict(job_config.model.rope_scaling, args.max_seq_len)
    except ConfigError as e:
        raise ConfigError(f"model.rope_scaling: {e}") from e
    return spec, dataclasses.replace(args, rope_scaling=scaling)


def hf_folder_args(hf_dir: str) -> list[str]:
    """Job-config arguments that make the Hugging Face folder hf_dir the model (family from its
    config.json, dimensions, tokenizer) and its initial weights."""
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ConfigError(f"{hf_dir!r} has no config.json; point at a Hugging Face model folder")
    family = read_hf_config(hf_dir).get("model_type")
    if family not in MODELS:
        raise ConfigError(f"{hf_dir}/config.json: model_type={family!r} is not supported; supported: {', '.join(sorted(MODELS))}")
    return ["--model.name", family, "--model.flavor", hf_dir, "--model.hf_assets_path", hf_dir,
            "--checkpoint.initial_load_path", hf_dir, "--checkpoint.initial_load_in_hf"]


def build_model(spec, model_args, parallel_dims: ParallelDims, settings: ModelSettings, device,
                source: WeightSource) -> Decoder:
    """On the meta device first, so no rank ever holds the unsharded model; then wrapped as
    `settings` say, materialized and filled from `source` (checkpoint/source.weight_source)."""
    with torch.device("meta"):
        model = Decoder(model_args)
    spec.parallelize_fn(model, parallel_dims, settings)
    # FSDP's CPU offload keeps the sharded fp32 parameters in host memory from the start.
    model.to_empty(device="cpu" if settings.cpu_offload else device)
    load_weights(model, spec, model_args, source)
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


def build_single_layout_model(job_config: JobConfig, device, source: WeightSource | None = None):
    """(spec, args, model): the job's model FSDP-sharded over however many ranks run this (no TP/CP,
    no compile, no checkpointing: parameter names are the same under every layout), filled from
    `source` (default: the job config's). The conversion commands' model."""
    spec, model_args = model_spec_and_args(job_config)
    parallel_dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=1, world_size=dist.get_world_size())
    settings = ModelSettings(("none",) * model_args.n_layers)  # fp32, FSDP over every rank
    model = build_model(spec, model_args, parallel_dims, settings, device, source or weight_source(job_config))
    return spec, model_args, model
