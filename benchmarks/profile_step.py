"""Where each system's step time goes on this GPU: kernel time per step by kind, side by side.

    python benchmarks/profile_step.py --flavor 0.6B --seq 8192 --output /tmp/prof.txt
    python benchmarks/profile_step.py --flavor 1.7B --seq 8192 --systems ours,torchtitan --output /tmp/prof.txt

For each system (built as in benchmarks/bench.py: benchmarks/bench_systems.py) it profiles 3
steps after warm-up and writes the profiler's table to --output with the system's name added
(prof.ours.txt, ...) and a Chrome/Perfetto trace next to it (*.trace.json). It prints GPU kernel
time per step grouped by kind (attention, matmul, optimizer, copies, fused elementwise), the
wall time per step (the profiler inflates it a little), and the kernels whose time differs most
between the first two systems.
"""

import argparse
import os
import sys
from typing import NamedTuple

import torch
from bench_systems import add_system_arguments, build_system, free, model_args_for, systems_from, time_steps

from longctx.config import parse_config
from longctx.launch import init_distributed

STEPS = 3  # profiled steps per system


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_system_arguments(p)
    p.set_defaults(systems="ours")
    p.add_argument("--seq", type=int, default=8192, help="sequence length")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before profiling (compilation)")
    p.add_argument("--output", default="profile.txt", help="the profiler tables (a .txt path; the system's name is added)")
    return p.parse_args(argv)


KERNEL_GROUPS = (  # (label, substrings of CUDA kernel names), first match wins
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas")),
    ("optimizer", ("adam", "multi_tensor")),
    ("collectives / copies", ("nccl", "memcpy", "memset", "copy", "chunk_cat", "split_with_sizes")),
    ("fused elementwise (triton)", ("triton",)),
)


# GPU-side ranges that span kernels (counted by their kernels already) and runtime calls.
ANNOTATIONS = ("FSDP::", "Optimizer.", "ProfilerStep", "CompiledFunction", "autograd::", "## ", "cuda")


class Profile(NamedTuple):
    """One system's STEPS profiled steps, per step: ms by kernel and by kind, wall ms, GPU idle ms
    between kernels, and the longest idle gaps as (ms, kernel before, kernel after)."""

    kernels: dict
    groups: dict
    wall_ms: float
    idle_ms: float
    gaps: list


def idle_gaps(events, top: int = 8) -> tuple[float, list]:
    """(GPU idle ms per step between the first and the last kernel, the `top` longest gaps as
    (ms, kernel before, kernel after)): where in the step the device waits for the host."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(ANNOTATIONS))
    gaps, busy_until, last = [], None, None
    for start, end, name in spans:
        if busy_until is not None and start > busy_until:
            gaps.append(((start - busy_until) / 1e3, last, name))
        if busy_until is None or end > busy_until:
            busy_until, last = end, name
    return sum(g for g, _, _ in gaps) / STEPS, sorted(gaps, key=lambda g: -g[0])[:top]


def profile(system, seq, vocab, device, path) -> Profile:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        times, _ = time_steps(system, seq, vocab, device, 1000, STEPS)
    events = prof.key_averages()
    with open(path, "w") as f:
        f.write(events.table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=90))
    prof.export_chrome_trace(os.path.splitext(path)[0] + ".trace.json")  # for chrome://tracing or Perfetto
    kernels, groups = {}, {}
    for e in events:
        t = getattr(e, "self_device_time_total", 0) or 0
        if t <= 0 or e.device_type != torch.autograd.DeviceType.CUDA or e.key.startswith(ANNOTATIONS):
            continue
        ms = t / 1e3 / STEPS
        kernels[e.key] = kernels.get(e.key, 0) + ms
        name = e.key.lower()
        label = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")
        groups[label] = groups.get(label, 0) + ms
    return Profile(kernels, groups, 1e3 * sum(times) / STEPS, *idle_gaps(prof.events()))


def print_tables(names, results: list[Profile]) -> None:
    labels = sorted({g for r in results for g in r.groups}, key=lambda g: -results[0].groups.get(g, 0))
    row = lambda label, values: print(f"{label:<30}" + "".join(f"{v:>14.1f}" for v in values))  # noqa: E731
    print(f"\nGPU kernel time, ms per step (mean of {STEPS} profiled steps):")
    print(f"{'kind':<30}" + "".join(f"{n:>14}" for n in names))
    for label in labels:
        row(label, [r.groups.get(label, 0) for r in results])
    row("all kernels", [sum(r.groups.values()) for r in results])
    row("GPU idle between kernels", [r.idle_ms for r in results])
    row("wall (profiled)", [r.wall_ms for r in results])
    for name, r in zip(names, results):
        print(f"\nLongest GPU idle gaps of {name} over {STEPS} steps (ms, kernel before -> kernel after):")
        for ms, before, after in r.gaps:
            print(f"{ms:>8.2f}  {before[:60]} -> {after[:60]}")
    if len(results) < 2:
        return
    a, b = results[0].kernels, results[1].kernels
    diffs = sorted(set(a) | set(b), key=lambda k: -abs(a.get(k, 0) - b.get(k, 0)))[:20]
    print(f"\nKernels whose time differs most, ms per step ({names[0]} / {names[1]}):")
    for k in diffs:
        print(f"{a.get(k, 0):>9.2f} {b.get(k, 0):>9.2f}  {k[:110]}")


def main(argv):
    args = parse_args(argv)
    names = systems_from(args)
    device = init_distributed(parse_config(["--job.config_file", args.config]))
    model_args = model_args_for(args)
    results = []
    for name in names:
        system = build_system(name, args, args.seq, device, model_args)
        time_steps(system, args.seq, model_args.vocab_size, device, 0, args.warmup)
        stem, ext = os.path.splitext(args.output)
        results.append(profile(system, args.seq, model_args.vocab_size, device, f"{stem}.{name}{ext or '.txt'}"))
        del system
        free()
        torch._dynamo.reset()
    print_tables(names, results)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
