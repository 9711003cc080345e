"""Where ours' step time goes on this GPU: a kernel-time table and a trace of 3 profiled steps.

    python benchmarks/profile_step.py --flavor 0.6B --seq 8192 --output /tmp/prof.txt

Writes the profiler's table to --output and a Chrome/Perfetto trace next to it (*.trace.json),
and prints GPU kernel time per step grouped by kind (attention, matmul, optimizer, FSDP copies,
fused elementwise). Ours is built as in benchmarks/bench.py (benchmarks/bench_systems.py).
"""

import argparse
import os
import sys

import torch
from bench_systems import Ours, model_args_for, ours_config, time_steps

from longctx.config import parse_config
from longctx.launch import init_distributed


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flavor", default="0.6B", help="Qwen3 size: 0.6B, 1.7B, ...")
    p.add_argument("--seq", type=int, default=8192, help="sequence length")
    p.add_argument("--ac", default="none", choices=("none", "full", "selective"), help="activation checkpointing")
    p.add_argument("--ac-option", default="2", help="selective: every N-th block, or op")
    p.add_argument("--config", default="train_configs/qwen3_bench.toml", help="our job config")
    p.add_argument("--override", action="append", default=[], help="extra --section.key=value for ours")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before profiling (compilation)")
    p.add_argument("--output", default="profile.txt", help="the profiler table (a .txt path)")
    return p.parse_args(argv)


KERNEL_GROUPS = (  # (label, substrings of CUDA kernel names), first match wins
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas")),
    ("optimizer", ("adam", "multi_tensor")),
    ("fsdp / copies", ("nccl", "memcpy", "memset", "copy", "chunk_cat", "split_with_sizes")),
    ("fused elementwise (triton)", ("triton",)),
)


# GPU-side ranges that span kernels (counted by their kernels already) and runtime calls.
ANNOTATIONS = ("FSDP::", "Optimizer.", "ProfilerStep", "CompiledFunction", "autograd::", "## ", "cuda")


def profile(system, seq, vocab, device, path):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        time_steps(system, seq, vocab, device, 1000, 3)
    events = prof.key_averages()
    with open(path, "w") as f:
        f.write(events.table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=90))
    prof.export_chrome_trace(os.path.splitext(path)[0] + ".trace.json")  # for chrome://tracing or Perfetto
    groups = {}
    for e in events:
        t = getattr(e, "self_device_time_total", 0) or 0
        if t <= 0 or e.device_type != torch.autograd.DeviceType.CUDA or e.key.startswith(ANNOTATIONS):
            continue
        name = e.key.lower()
        label = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")
        groups[label] = groups.get(label, 0) + t
    total = sum(groups.values())
    if not total:
        return
    print(f"\nGPU kernel time by kind over 3 steps (ours; full table in {path}):")
    for label, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<28}{t / 3e3:>9.1f} ms/step {100 * t / total:>6.1f}%")



def main(argv):
    args = parse_args(argv)
    device = init_distributed(parse_config(["--job.config_file", args.config]))
    vocab = model_args_for(args).vocab_size
    system = Ours(ours_config(args.config, args.flavor, args.seq, args.ac, args.ac_option, args.override), device)
    time_steps(system, args.seq, vocab, device, 0, args.warmup)
    profile(system, args.seq, vocab, device, args.output)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
