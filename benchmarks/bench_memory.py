"""Planned vs measured peak memory of ours on this GPU, over a list of layouts, in one process.

    python benchmarks/bench_memory.py                       # the default cases (about 5 minutes on an H200)
    python benchmarks/bench_memory.py --cases 0.6B/32768/full "0.6B/1048576/full+offload+tiles/2"
    python benchmarks/bench_memory.py --plan-only           # the planned column alone, on any machine
    python benchmarks/bench_memory.py --cases 0.6B/32768/full --snapshot /tmp/snapshots   # what is live at the peak

A case is FLAVOR/SEQ/SETTINGS[/LAYERS]: SETTINGS joins none|full|op with +offload (activation
offload), +tiles (mlp_chunk_size 16384), +hostopt (training.enable_cpu_offload); LAYERS keeps only
the first layers (a reduced-depth model: the same per-layer memory at a step time that fits a
short run; the plan for full depth is printed next to it). Each case trains 2 steps of random
tokens (the second has AdamW state) and reports torch.cuda.max_memory_allocated against
planner/memory.py's peak.
"""

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # long sequences fragment

import torch
from bench_systems import Ours, free, memory_gib, reset_memory, time_steps

from longctx.config import parse_config
from longctx.launch import init_distributed, model_settings
from longctx.modeling import model_spec_and_args
from longctx.models.common.args import args_to_hf_config
from longctx.parallelisms.parallel_dims import ParallelDims
from longctx.planner.memory import GIB, layout_for, plan_memory

CONFIG = "train_configs/qwen3_bench.toml"
DEFAULT_CASES = [
    "0.6B/8192/none", "0.6B/32768/full", "0.6B/32768/op", "0.6B/65536/full+offload", "0.6B/65536/full+tiles",
    "1.7B/32768/op", "4B/16384/full", "0.6B/262144/full+offload+tiles/4", "1.7B/131072/full+offload+tiles/4",
]
SETTINGS = {
    "none": ["--activation_checkpoint.mode", "none"],
    "full": ["--activation_checkpoint.mode", "full"],
    "op": ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"],
    "offload": ["--activation_checkpoint.cpu_offload"],
    "tiles": ["--activation_checkpoint.mlp_chunk_size", "16384"],
    "hostopt": ["--training.enable_cpu_offload"],
}


def case_args(case: str, folder: str) -> tuple[list[str], list[str]]:
    """(arguments of this case, the same at full depth)."""
    flavor, seq, settings, *layers = case.split("/")
    common = ["--job.config_file", CONFIG, "--training.seq_len", seq,
              "--parallelism.fsdp_reshard_after_forward", "default"]
    for setting in settings.split("+"):
        common += SETTINGS[setting]
    full = common + ["--model.flavor", flavor]
    if not layers:
        return full, full
    # A reduced-depth model is an HF config.json of the flavor with fewer layers.
    model_args = model_spec_and_args(parse_config(full))[1]
    path = os.path.join(folder, case.replace("/", "_"), "config.json")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        json.dump(args_to_hf_config(model_args) | {"model_type": "qwen3", "num_hidden_layers": int(layers[0])}, f)
    return common + ["--model.flavor", path], full


def planned_gib(argv: list[str]) -> float:
    """The planner's peak for this job on one GPU, with the settings the run itself takes (auto's choice too)."""
    job_config = parse_config(argv)
    _, model_args = model_spec_and_args(job_config)
    dims = ParallelDims.from_config(job_config.parallelism, 1, model_args.n_heads, model_args.n_kv_heads)
    settings = model_settings(job_config, model_args, dims, device_type="cuda")
    training = job_config.training
    layout = layout_for(settings, dims, training.seq_len, training.local_batch_size)
    return plan_memory(model_args, layout)[0]["peak"] / GIB


def train_two_steps(argv: list[str], device) -> float:
    """Seconds of the second step. The system lives in this frame only, so it is garbage once we return."""
    system = Ours(argv, device)
    times, _ = time_steps(system, system.job_config.training.seq_len, system.model_args.vocab_size, device, 0, 2)
    return times[-1]


def measure(argv: list[str], device, snapshot: str | None = None) -> tuple[float, float]:
    """(peak GiB allocated over 2 steps, seconds of the second step); nan when out of memory.
    snapshot: a file for the CUDA allocator's history of the case (every live tensor at the peak,
    with the stack that allocated it: pytorch.org/memory_viz)."""
    reset_memory(device)
    recording = snapshot is not None and device.type == "cuda"
    if recording:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    try:
        step_s = train_two_steps(argv, device)
        result = memory_gib(device)[0], step_s
    except torch.OutOfMemoryError:
        result = float("nan"), float("nan")
    if recording:
        torch.cuda.memory._dump_snapshot(snapshot)
        torch.cuda.memory._record_memory_history(enabled=None)
    torch._dynamo.reset()
    free()
    return result


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="FLAVOR/SEQ/SETTINGS[/LAYERS]")
    p.add_argument("--plan-only", action="store_true", help="print the plans without training (no GPU needed)")
    p.add_argument("--snapshot", metavar="DIR", help="write each case's allocator snapshot to DIR/CASE.pickle")
    args = p.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="bench_memory_")
    if args.plan_only:
        for case in args.cases:
            reduced, full = case_args(case, folder)
            print(f"[{case}] planned {planned_gib(reduced):.2f} GiB" +
                  (f", at full depth {planned_gib(full):.2f} GiB" if reduced != full else ""))
        return
    device = init_distributed(parse_config(["--job.config_file", CONFIG]))
    torch._dynamo.config.recompile_limit = 64
    if args.snapshot:
        os.makedirs(args.snapshot, exist_ok=True)
    rows = []
    for case in args.cases:
        reduced, full = case_args(case, folder)
        snapshot = os.path.join(args.snapshot, case.replace("/", "_").replace("+", "-") + ".pickle") if args.snapshot else None
        measured, step_s = measure(reduced, device, snapshot)
        rows.append((case, planned_gib(reduced), measured, step_s, planned_gib(full) if reduced != full else None))
        print(f"[{case}] planned {rows[-1][1]:.2f} GiB, measured {measured:.2f} GiB, step {step_s:.1f} s", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\nplanned vs measured peak (torch.cuda.max_memory_allocated, 2 steps) | {name} | torch {torch.__version__}")
    print("| case | planned GiB | measured GiB | measured / planned | step s | plan at full depth GiB |")
    print("|---|---|---|---|---|---|")
    for case, planned, measured, step_s, full in rows:
        print(f"| {case} | {planned:.2f} | {measured:.2f} | {measured / planned:.3f} | {step_s:.1f} | "
              f"{'' if full is None else f'{full:.2f}'} |")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
