"""A DCP checkpoint (saved under any parallel layout) -> a Hugging Face model folder.

    python scripts/convert_dcp_to_hf.py DCP_DIR HF_DIR --job.config_file CONFIG [--dtype bf16|fp32]
    python scripts/convert_dcp_to_hf.py outputs/debug/checkpoint out/hf --job.config_file train_configs/debug.toml

DCP_DIR is a step-N folder of a training run, a model-only checkpoint (convert_hf_to_dcp.py), or
a run's checkpoint folder (its latest complete step). The model is the job config's model.name and
model.flavor; further --section.key arguments override it as for train.py. HF_DIR gets sharded
safetensors + model.safetensors.index.json + config.json + generation_config.json, and the
tokenizer files of model.hf_assets_path; transformers.AutoModelForCausalLM.from_pretrained opens it.
The dtype defaults to checkpoint.export_dtype; file size is bounded by checkpoint.export_max_shard_gb.
"""

import argparse

from longctx.base import log
from longctx.checkpoint.dcp import resolve_dcp_path
from longctx.checkpoint.files import refuse_existing
from longctx.checkpoint.hf import export_hf
from longctx.checkpoint.source import WeightSource
from longctx.config import parse_config
from longctx.launch import check_output, distributed, run_command
from longctx.modeling import build_single_layout_model


def convert(dcp_dir: str, hf_dir: str, config_args: list[str], dtype: str | None) -> None:
    check_output("HF_DIR", hf_dir, folder=True)
    refuse_existing(hf_dir)
    job_config = parse_config(config_args)
    source = WeightSource("dcp", resolve_dcp_path(dcp_dir), " (converting to Hugging Face)")
    with distributed(job_config) as device:
        spec, model_args, model = build_single_layout_model(job_config, device, source)
        ckpt = job_config.checkpoint
        export_hf(model, spec, model_args, hf_dir, dtype or ckpt.export_dtype, job_config.model.hf_assets_path,
                  ckpt.export_max_shard_gb)
        log(f"wrote {hf_dir}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Other --section.key VALUE arguments override the job config.")
    parser.add_argument("dcp_dir", metavar="DCP_DIR", help="DCP step folder, or a checkpoint folder of step-N")
    parser.add_argument("hf_dir", metavar="HF_DIR", help="output folder; must not exist yet (its parent must)")
    parser.add_argument("--job.config_file", dest="config_file", metavar="CONFIG", required=True,
                        help="the training job's TOML (model.name, model.flavor, model.hf_assets_path)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="default: checkpoint.export_dtype")
    args, overrides = parser.parse_known_args(argv)
    convert(args.dcp_dir, args.hf_dir, ["--job.config_file", args.config_file, *overrides], args.dtype)


if __name__ == "__main__":
    run_command(main)
