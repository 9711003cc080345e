"""Hugging Face model folder -> a model-only DCP checkpoint that train.py starts from.

    python scripts/convert_hf_to_dcp.py HF_DIR DCP_DIR
    python train.py --job.config_file train_configs/debug.toml --model.flavor DCP_DIR \\
        --model.hf_assets_path DCP_DIR --checkpoint.initial_load_path DCP_DIR

The model (family and every dimension) comes from HF_DIR/config.json. DCP_DIR gets the weights in
train.py's own names plus copies of config.json, generation_config.json and the tokenizer files,
so it serves as model.flavor and model.hf_assets_path too. As checkpoint.initial_load_path (with
initial_load_in_hf false, the default) any layout reads it; copied to
{dump_folder}/{checkpoint.folder}/step-0 it is where a run with checkpoint.enable starts.
Under torchrun each rank reads and writes only its FSDP shard.
"""

import argparse
import json
import os
import shutil
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from components import build  # noqa: E402
from components.checkpoint import CheckpointError, save_dcp_model  # noqa: E402
from components.config import parse_config  # noqa: E402
from components.hf_export import TOKENIZER_FILES  # noqa: E402
from models import MODELS, get_model_spec  # noqa: E402
from parallelisms.parallel_dims import ParallelDims  # noqa: E402


def hf_job_config(hf_dir: str):
    """A job whose model is the HF folder: family from config.json, weights loaded and checked."""
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{hf_dir!r} has no config.json; point HF_DIR at a Hugging Face model folder")
    with open(config_path) as f:
        family = json.load(f).get("model_type")
    if family not in MODELS:
        raise CheckpointError(f"{config_path}: model_type={family!r} is not supported; supported: {', '.join(sorted(MODELS))}")
    job_config = parse_config(["--model.name", str(family), "--model.flavor", hf_dir, "--model.hf_assets_path", hf_dir])
    ckpt = job_config.checkpoint
    ckpt.enable, ckpt.initial_load_path, ckpt.initial_load_in_hf = False, hf_dir, True
    return job_config


def build_single_layout_model(job_config):
    """The job's model, FSDP-sharded over however many ranks run this (no TP/CP, no compile:
    parameter names are the same under every layout), filled by components.build.build_model."""
    spec = get_model_spec(job_config.model.name)
    model_args = spec.args_for(job_config.model.flavor)
    job_config.compile.enable, job_config.activation_checkpoint.mode = False, "none"
    device = build.init_distributed(job_config)
    parallel_dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=1, world_size=dist.get_world_size())
    return spec, model_args, build.build_model(spec, model_args, parallel_dims, job_config, device)


def convert(hf_dir: str, dcp_dir: str) -> None:
    if os.path.exists(dcp_dir):
        raise CheckpointError(f"{dcp_dir} already exists; remove it or choose another output folder")
    job_config = hf_job_config(hf_dir)
    try:
        _, _, model = build_single_layout_model(job_config)
        save_dcp_model(model, dcp_dir)
        if dist.get_rank() == 0:
            for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
                if os.path.isfile(os.path.join(hf_dir, name)):
                    shutil.copy(os.path.join(hf_dir, name), dcp_dir)
            print(f"wrote {dcp_dir}", flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model folder (config.json + *.safetensors)")
    parser.add_argument("dcp_dir", metavar="DCP_DIR", help="output folder; must not exist yet")
    args = parser.parse_args(argv)
    try:
        convert(args.hf_dir, args.dcp_dir)
    except ValueError as e:  # CheckpointError, ConfigError and the model's own refusals: one line each
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
