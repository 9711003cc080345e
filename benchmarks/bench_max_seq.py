"""The longest sequence each system trains one step at on this GPU (doubling, then bisection).

    python benchmarks/bench_max_seq.py --flavor 0.6B --seq 16384 --ac full --systems hf --granularity 4096
    python benchmarks/bench_max_seq.py --flavor 0.6B --seq 524288 --seq-cap 1048576 --ac full --systems ours \\
        --override=--parallelism.fsdp_reshard_after_forward=default --override=--activation_checkpoint.cpu_offload

Systems and their settings: benchmarks/bench_systems.py. `scripts/plan.py --max-seq` predicts the
same number for ours without a GPU.
"""

import argparse
import os
import sys

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


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_system_arguments(p)
    p.add_argument("--seq", type=int, default=16384, help="where the search starts")
    p.add_argument("--seq-cap", type=int, default=1 << 20, help="never try longer than this")
    p.add_argument("--granularity", type=int, default=8192, help="bisect down to this many tokens")
    return p.parse_args(argv)


def one_step(name, args, seq, device, model_args) -> float:
    """Seconds of one step of a system built at this length; it is garbage once this returns."""
    system = build_system(name, args, seq, device, model_args)
    (elapsed,), _ = time_steps(system, seq, model_args.vocab_size, device, 0, 1)
    return elapsed


def fits(name, args, seq, device, model_args) -> bool:
    """Build the system at this length and train one step."""
    ok, elapsed = False, float("nan")
    reset_memory(device)
    try:
        elapsed, ok = one_step(name, args, seq, device, model_args), True
    except torch.OutOfMemoryError:
        pass  # the exception (and the frames holding tensors) is dropped on leaving the handler
    alloc, _ = memory_gib(device)
    free()
    print(f"[{name}] seq {seq}: {'ok' if ok else 'OOM'} (peak {alloc:.1f} GiB, step {elapsed:.1f} s)", flush=True)
    return ok


def longest(name, args, device, model_args) -> tuple[int, int | None]:
    good, bad, seq = 0, None, args.seq
    while seq <= args.seq_cap:  # double until out of memory (or the cap)
        if not fits(name, args, seq, device, model_args):
            bad = seq
            break
        good, seq = seq, seq * 2
    while bad is not None and bad - good > args.granularity:  # then bisect
        mid = (good + bad) // 2 // args.granularity * args.granularity
        good, bad = (mid, bad) if fits(name, args, mid, device, model_args) else (good, mid)
    return good, bad


def main(argv):
    args = parse_args(argv)
    names = systems_from(args)
    device = init_distributed(parse_config(["--job.config_file", args.config]))
    model_args = model_args_for(args)
    torch._dynamo.config.recompile_limit = 64  # every trial is a new shape
    torch._dynamo.config.accumulated_recompile_limit = 4096
    results = {}
    for name in names:
        results[name] = longest(name, args, device, model_args)
        torch._dynamo.reset()
    print(f"\nlongest trainable sequence, Qwen3-{args.flavor} ac={args.ac} batch 1 | "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'} | torch {torch.__version__}")
    for name, (good, bad) in results.items():
        print(f"{name:<12} trains {good or 'nothing tried'}; {'OOM at ' + str(bad) if bad else 'cap ' + str(args.seq_cap) + ' reached'}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
