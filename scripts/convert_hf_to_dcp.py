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
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from components import build  # noqa: E402
from components.checkpoint import save_dcp_model  # noqa: E402
from components.config import parse_config  # noqa: E402
from components.files import refuse_existing  # noqa: E402
from parallelisms.parallel_dims import ParallelDims  # noqa: E402


def build_single_layout_model(job_config, source=None):
    """The job's model, FSDP-sharded over however many ranks run this (no TP/CP, no compile:
    parameter names are the same under every layout), filled from `source` (default: the job
    config's) by components.build.build_model."""
    spec, model_args = build.model_spec_and_args(job_config)
    job_config.compile.enable, job_config.activation_checkpoint.mode = False, "none"
    device = build.init_distributed(job_config)
    parallel_dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=1, world_size=dist.get_world_size())
    return spec, model_args, build.build_model(spec, model_args, parallel_dims, job_config, device, source)


def convert(hf_dir: str, dcp_dir: str) -> None:
    refuse_existing(dcp_dir)
    job_config = parse_config(build.hf_folder_args(hf_dir))  # weights loaded and checked from HF_DIR
    try:
        _, _, model = build_single_layout_model(job_config)
        save_dcp_model(model, dcp_dir, assets_from=hf_dir)
        build.log(f"wrote {dcp_dir}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model folder (config.json + *.safetensors)")
    parser.add_argument("dcp_dir", metavar="DCP_DIR", help="output folder; must not exist yet")
    args = parser.parse_args(argv)
    convert(args.hf_dir, args.dcp_dir)


if __name__ == "__main__":
    build.run_command(main, sys.argv[1:])
