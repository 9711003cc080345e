"""The entry point: `python train.py --job.config_file train_configs/debug.toml` (or under torchrun).

The loop itself is longctx/train.py; this file only lets the README's command run from the repo root."""

from longctx.launch import run_command
from longctx.train import main

if __name__ == "__main__":
    run_command(main)
