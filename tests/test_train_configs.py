"""Every TOML under train_configs/ parses, names a real model, and its parallel layout is valid for
the number of GPUs its header says to launch it on."""

import glob
import os

import pytest

from longctx.config import parse_config
from longctx.modeling import model_spec_and_args
from longctx.models import get_model_spec
from longctx.parallelisms.parallel_dims import ParallelDims
from tests.conftest import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "train_configs", "*.toml")))
# The launch each real-size config documents: its world size.
WORLD_SIZES = {"qwen3_0.6b.toml": 8, "qwen3_1.7b.toml": 8, "qwen3_8b.toml": 8, "qwen3_32b.toml": 16, "qwen2.5_7b.toml": 8,
               "qwen3_8b_yarn_128k.toml": 8}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_parses_and_opens_with_how_to_launch(path):
    with open(path) as f:
        first = f.readline()
    assert first.startswith("# "), f"{path} should open with a comment saying what it trains and how to launch it"
    job = parse_config(["--job.config_file", path])
    model_spec_and_args(job)  # raises on an unknown flavor or a bad rope scaling


@pytest.mark.parametrize("name,world_size", sorted(WORLD_SIZES.items()))
def test_real_size_layout_fits_its_world_size(name, world_size):
    job = parse_config(["--job.config_file", os.path.join(ROOT, "train_configs", name)])
    args = get_model_spec(job.model.name).args_for(job.model.flavor)
    t = job.training
    dims = ParallelDims.from_config(job.parallelism, world_size, args.n_heads, args.n_kv_heads)
    assert t.seq_len % dims.seq_multiple == 0
    assert t.global_batch_size % (t.local_batch_size * dims.dp) == 0, "whole micro-batches per dp rank"
    assert job.checkpoint.initial_load_in_hf and job.checkpoint.initial_load_path == job.model.hf_assets_path
