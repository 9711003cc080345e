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

from longctx.base import log
from longctx.checkpoint.dcp import save_dcp_model
from longctx.checkpoint.files import refuse_existing
from longctx.config import parse_config
from longctx.launch import check_output, distributed, run_command
from longctx.modeling import build_single_layout_model, hf_folder_args


def convert(hf_dir: str, dcp_dir: str) -> None:
    check_output("DCP_DIR", dcp_dir, folder=True)
    refuse_existing(dcp_dir)
    job_config = parse_config(hf_folder_args(hf_dir))  # weights loaded and checked from HF_DIR
    with distributed(job_config) as device:
        _, _, model = build_single_layout_model(job_config, device)
        save_dcp_model(model, dcp_dir, assets_from=hf_dir)
        log(f"wrote {dcp_dir}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model folder (config.json + *.safetensors)")
    parser.add_argument("dcp_dir", metavar="DCP_DIR", help="output folder; must not exist yet (its parent must)")
    args = parser.parse_args(argv)
    convert(args.hf_dir, args.dcp_dir)


if __name__ == "__main__":
    run_command(main)
