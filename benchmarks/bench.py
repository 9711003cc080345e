"""Time training steps on one GPU: ours vs torchtitan 0.2.2's Qwen3 vs Hugging Face transformers' Qwen3.

    python benchmarks/bench.py --flavor 0.6B --seq 8192                     # the speed table
    python benchmarks/bench.py --flavor 0.6B --seq 32768 --ac full --systems ours,torchtitan
    python benchmarks/bench.py --flavor 0.6B --seq 32768 --ac selective --ac-option op --systems ours,torchtitan

The systems are in benchmarks/bench_systems.py; sibling tools: bench_max_seq.py (longest sequence),
bench_memory.py (planned vs measured memory), profile_step.py (where ours' time goes),
probe_attention.py (SDPA kernels). Each step trains a fresh random batch (batch 1). Flops per
token are models/common/args.py's `flops_per_token`: "MFU" counts attention over all T keys
(torchtitan's convention), "causal MFU" only the causal half the kernel computes; both against
the device's dense bf16 peak (metrics.py). Times are the median of the steps after
warm-up, each ending in a host sync.
"""

import argparse
import os
import statistics
import sys
import tempfile

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # long sequences fragment

import torch
from bench_systems import (
    add_system_arguments,
    build_system,
    free,
    memory_gib,
    model_args_for,
    reset_memory,
    systems_from,
    time_steps,
)

from longctx.config import parse_config
from longctx.launch import init_distributed
from longctx.metrics import mfu, peak_flops


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_system_arguments(p)
    p.add_argument("--seq", type=int, default=8192, help="sequence length")
    p.add_argument("--steps", type=int, default=12, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    return p.parse_args(argv)


def measure(name, args, device, model_args, hf_weights) -> dict:
    reset_memory(device)
    system = build_system(name, args, args.seq, device, model_args, hf_weights if name == "ours" else None)
    if name == "hf" and hf_weights:
        system.save(hf_weights)
    vocab = model_args.vocab_size
    warm_times, warm_losses = time_steps(system, args.seq, vocab, device, 0, args.warmup)
    times, losses = time_steps(system, args.seq, vocab, device, args.warmup, args.steps)
    print(f"[{name}] losses {[round(x, 4) for x in warm_losses + losses]}", flush=True)
    alloc, reserved = memory_gib(device)  # the caller frees the system once this frame is gone
    return dict(system=name, first_loss=warm_losses[0], last_loss=losses[-1], first_step_s=warm_times[0],
                alloc=alloc, reserved=reserved, **speed(times, args, model_args, device))


def speed(times, args, model_args, device) -> dict:
    """Tokens/s of the whole job; MFU per GPU (under torchrun the GPUs share the sequence: cp)."""
    median = statistics.median(times)
    tokens_per_s = args.seq / median
    n_gpus = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    span = args.doc_len or args.seq  # attention spans one document
    peak = peak_flops(device)
    return dict(step_ms=median * 1e3, spread_ms=(max(times) - min(times)) * 1e3, tokens_per_s=tokens_per_s,
                mfu=mfu(tokens_per_s / n_gpus, model_args.flops_per_token(span), peak),
                mfu_causal=mfu(tokens_per_s / n_gpus, model_args.flops_per_token(span, causal=True), peak))


def failed_row(name, device) -> dict:
    nan = float("nan")
    return dict(system=f"{name} OOM", tokens_per_s=nan, mfu=nan, mfu_causal=nan, step_ms=nan, spread_ms=nan,
                alloc=memory_gib(device)[0], reserved=nan, first_loss=nan, last_loss=nan, first_step_s=nan)


def print_table(rows, args, model_args, device) -> None:
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    flops = model_args.flops_per_token(args.doc_len or args.seq)
    print(f"\nQwen3-{args.flavor} seq {args.seq} batch 1 ac={args.ac} torchtitan={args.titan_precision} | {device_name} "
          f"(peak {peak_flops(device) / 1e12:.0f} TFLOP/s) | torch {torch.__version__} | {flops / 1e9:.2f} GFLOP/token | "
          f"median of {args.steps} steps after {args.warmup} warm-up, a new random batch each step")
    print(f"{'system':<16}{'tok/s':>10}{'MFU':>7}{'causal':>8}{'step ms':>10}{'spread':>8}{'alloc GiB':>11}"
          f"{'resv GiB':>10}{'loss@1':>9}{'loss@end':>9}{'1st step s':>11}")
    for r in rows:
        print(f"{r['system']:<16}{r['tokens_per_s']:>10.0f}{r['mfu']:>7.3f}{r['mfu_causal']:>8.3f}{r['step_ms']:>10.1f}"
              f"{r['spread_ms']:>8.1f}{r['alloc']:>11.2f}{r['reserved']:>10.2f}{r['first_loss']:>9.4f}"
              f"{r['last_loss']:>9.4f}{r['first_step_s']:>11.1f}")
    by = {r["system"]: r for r in rows}
    for other in ("hf", "torchtitan"):
        if "ours" in by and other in by:
            print(f"ours/{other}: {by['ours']['tokens_per_s'] / by[other]['tokens_per_s']:.2f}x speed, "
                  f"{by['ours']['alloc'] / by[other]['alloc']:.0%} of its memory")


def main(argv):
    args = parse_args(argv)
    names = systems_from(args)
    # One process group for ours (FSDP2 on one GPU); the others ignore it.
    device = init_distributed(parse_config(["--job.config_file", args.config]))
    model_args = model_args_for(args)
    # Same initial weights for ours and hf, so their first losses agree: hf runs first and saves.
    hf_weights = tempfile.mkdtemp(prefix="hf_weights_") if {"hf", "ours"} <= set(names) else None
    rows = []
    for name in sorted(names, key=lambda s: s != "hf"):
        try:
            rows.append(measure(name, args, device, model_args, hf_weights))
        except torch.OutOfMemoryError:
            rows.append(failed_row(name, device))
        free()
        torch._dynamo.reset()
    print_table(rows, args, model_args, device)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
