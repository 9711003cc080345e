"""The parity suite on GPUs over NCCL (skips without 2+ GPUs): every layout the machine has GPUs
for must reproduce the 1-GPU run, in fp32 parameters (tight) and in bf16 mixed precision."""

import pytest
import torch

from tests.conftest import assert_rel_close
from tests.distributed_harness import run_on_ranks
from tests.test_parallel import COMPILE_OP_AC, LAYOUTS, assert_matches_reference, overrides, train_layouts

N_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(N_GPUS < 2, reason="needs 2+ CUDA GPUs")

PRECISIONS = {
    # fp32 parameters; TF32 stays off (torch's default), so only reduction order differs.
    "fp32": (["--training.mixed_precision_param", "float32", "--training.steps", "5"], 1e-4),
    # bf16 compute, fp32 master weights and reductions: a layout changes bf16 rounding of partial sums.
    "bf16": (["--training.mixed_precision_param", "bfloat16", "--training.steps", "5"], 2e-2),
}


def assert_matches_one_gpu(result: dict, ref: dict, name: str, precision: str, rtol: float) -> None:
    """fp32: every step's loss and grad norm, final weights and grads; bf16: loss and grad norm."""
    print(f"{precision} {name}: loss {result['loss']} (1 GPU {ref['loss']}); "
          f"grad_norm {result['grad_norm']} (1 GPU {ref['grad_norm']})")
    if precision == "fp32":
        assert_matches_reference(result, ref, name, rtol)
    else:
        assert_rel_close(torch.tensor(result["loss"]), torch.tensor(ref["loss"]), rtol, f"{name} loss")
        assert_rel_close(torch.tensor(result["grad_norm"]), torch.tensor(ref["grad_norm"]), rtol, f"{name} grad_norm")


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_gpu_layouts_match_one_gpu(precision, hf_dir, tmp_path):
    extra, rtol = PRECISIONS[precision]
    ref = run_on_ranks(1, train_layouts, [overrides(hf_dir, str(tmp_path / "ref"), {}, extra)], use_gpus=True)[0]
    for world_size in [w for w in sorted(LAYOUTS) if w <= N_GPUS]:
        names = [n for n, layout in LAYOUTS[world_size].items() if not layout.get("random_init")]
        cases = [overrides(hf_dir, str(tmp_path / n), LAYOUTS[world_size][n], extra) for n in names]
        for name, result in zip(names, run_on_ranks(world_size, train_layouts, cases, use_gpus=True)):
            assert_matches_one_gpu(result, ref, name, precision, rtol)


# This round's features on two GPUs, each against the 1-GPU run with the same model flags.
YARN = ["--model.rope_scaling", "type", "yarn", "factor", "4.0", "original_max_position_embeddings", "32"]
OFFLOAD_TILES = ["--activation_checkpoint.mode", "full", "--activation_checkpoint.cpu_offload",
                 "--activation_checkpoint.mlp_chunk_size", "48"]
FEATURES = {
    # name: (the 2-GPU layout, flags both runs share)
    "cp2 sequence shard": ({"cp": 2, "flags": ["--parallelism.context_parallel_ulysses_degree", "1"]}, []),
    "cp2 Ulysses, yarn": ({"cp": 2}, YARN),
    "cp2 shard, yarn": ({"cp": 2, "flags": ["--parallelism.context_parallel_ulysses_degree", "1"]}, YARN),
    "dp2 FSDP, offload + tiled MLP": ({"dp_shard": 2}, OFFLOAD_TILES),
    "cp2 + compile + per-op AC": ({"cp": 2, "flags": COMPILE_OP_AC}, []),
}


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_gpu_features_match_one_gpu(precision, hf_dir, tmp_path):
    extra, rtol = PRECISIONS[precision]
    names = list(FEATURES)
    shared = sorted({tuple(flags) for _, flags in FEATURES.values()})
    refs = run_on_ranks(1, train_layouts, [overrides(hf_dir, str(tmp_path / f"ref{i}"), {}, [*flags, *extra])
                                           for i, flags in enumerate(shared)], use_gpus=True)
    ref_of = dict(zip(shared, refs))
    cases = [overrides(hf_dir, str(tmp_path / f"case{i}"), FEATURES[n][0], [*FEATURES[n][1], *extra])
             for i, n in enumerate(names)]
    for name, result in zip(names, run_on_ranks(2, train_layouts, cases, use_gpus=True)):
        assert_matches_one_gpu(result, ref_of[tuple(FEATURES[name][1])], name, precision, rtol)
