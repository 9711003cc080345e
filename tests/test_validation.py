"""Impossible parallel layouts are refused before any process group exists, in one line."""

import os
import subprocess
import sys

import pytest

from longctx.base import ConfigError
from longctx.parallelisms.parallel_dims import ParallelDims
from tests.conftest import ROOT


@pytest.mark.parametrize(
    "degrees, world_size, heads, message",
    [
        (dict(dp_replicate=1, dp_shard=2, cp=2, tp=2), 4, (16, 8), "= 8 != world_size(4)"),
        (dict(dp_replicate=1, dp_shard=-1, cp=3, tp=1), 8, (16, 8), "not divisible by dp_replicate*cp*tp"),
        (dict(dp_replicate=1, dp_shard=1, cp=1, tp=3), 3, (16, 8), "n_heads=16 is not divisible by tensor_parallel_degree=3"),
        (dict(dp_replicate=1, dp_shard=1, cp=1, tp=16), 16, (32, 8), "n_kv_heads=8 is not divisible by tensor_parallel_degree=16"),
        (dict(dp_replicate=1, dp_shard=1, cp=8, tp=4, cp_ulysses=8), 32, (16, 8),
         "context_parallel_ulysses_degree=8 does not fit the local heads (n_heads/tp = 16/4 = 4 query, 2 kv"),
        (dict(dp_replicate=1, dp_shard=1, cp=4, tp=1, cp_ulysses=4), 4, (12, 6),
         "use 2 (cp 4 = ulysses 2 x shard 2) or -1"),
        (dict(dp_replicate=1, dp_shard=1, cp=4, tp=1, cp_ulysses=3), 4, (12, 6), "context_parallel_ulysses_degree=3 does not divide"),
    ],
)
def test_impossible_layouts_name_the_numbers(degrees, world_size, heads, message):
    with pytest.raises(ConfigError, match=None) as info:
        ParallelDims(**degrees, world_size=world_size).for_heads(*heads)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "degrees, world_size, heads, split",
    [
        (dict(dp_replicate=2, dp_shard=2, cp=2, tp=2), 16, (16, 8), (2, 1)),  # kv 8/2 = 4 split over cp 2
        (dict(dp_replicate=1, dp_shard=1, cp=8, tp=1), 8, (16, 2), (8, 1)),  # kv 2 replicated up to cp 8
        (dict(dp_replicate=1, dp_shard=-1, cp=2, tp=8), 64, (32, 8), (2, 1)),  # dp_shard inferred: 4
        (dict(dp_replicate=1, dp_shard=1, cp=8, tp=1), 8, (28, 4), (4, 2)),  # Qwen2.5-7B at cp 8
        (dict(dp_replicate=1, dp_shard=1, cp=16, tp=1), 16, (40, 8), (8, 2)),  # Qwen3-14B at cp 16
        (dict(dp_replicate=1, dp_shard=1, cp=8, tp=4), 32, (16, 8), (4, 2)),  # 4 local heads at cp 8
        (dict(dp_replicate=1, dp_shard=1, cp=3, tp=1), 3, (6, 2), (1, 3)),  # kv 2 fits no Ulysses 3: all shard
        (dict(dp_replicate=1, dp_shard=1, cp=4, tp=1), 4, (12, 6), (2, 2)),
        (dict(dp_replicate=1, dp_shard=1, cp=8, tp=1, cp_ulysses=1), 8, (16, 8), (1, 8)),  # pure sharding
    ],
)
def test_possible_layouts_pass_and_split_cp(degrees, world_size, heads, split):
    dims = ParallelDims(**degrees, world_size=world_size).for_heads(*heads)
    assert dims.dp_replicate * dims.dp_shard * dims.cp * dims.tp == world_size
    assert (dims.cp_ulysses, dims.cp_shard) == split


def test_train_refuses_layout_before_starting(tmp_path):
    """What a user sees: one line on stderr, exit code 2, no process group, nothing written."""
    env = dict(os.environ, WORLD_SIZE="16", PYTHONPATH=ROOT)
    cmd = [sys.executable, "train.py", "--job.config_file", "train_configs/debug.toml",
           "--job.dump_folder", str(tmp_path / "out"), "--parallelism.tensor_parallel_degree", "16"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "tensor_parallel_degree=16" in lines[0]
    assert not (tmp_path / "out").exists()
