"""Each GPU's memory for a training layout, by term, before launch: on CPU, in seconds, no model built.

    python scripts/plan.py --job.config_file train_configs/qwen3_8b.toml --ngpu 8
    python scripts/plan.py --job.config_file train_configs/qwen3_bench.toml --ngpu 1 --max-seq \\
        --activation_checkpoint.mode full --activation_checkpoint.cpu_offload --gpu-mem-gib 140

Every other argument is a job-config override, as for train.py. The terms and their assumptions
are in planner/memory.py; how close they come to torch.cuda.max_memory_allocated is the
planned-vs-measured table of docs/performance.md (benchmarks/bench_memory.py measures it).
"""

import argparse
import dataclasses

from longctx.base import ConfigError
from longctx.config import parse_config
from longctx.launch import auto_candidates, model_settings, run_command
from longctx.modeling import model_spec_and_args
from longctx.parallelisms.parallel_dims import ParallelDims
from longctx.planner.auto import MARGIN
from longctx.planner.memory import GIB, largest_term, layout_for, longest_seq, plan_memory


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ngpu", type=int, default=1, help="processes of the job (the world size)")
    p.add_argument("--max-seq", action="store_true", help="also find the longest training.seq_len that fits both budgets")
    p.add_argument("--gpu-mem-gib", type=float, default=140.0, help="device memory per GPU (H200: 140; H100: 79)")
    p.add_argument("--host-mem-gib", type=float, default=1800.0, help="host memory per node")
    p.add_argument("--gpus-per-host", type=int, default=8, help="GPUs sharing one node's host memory")
    p.add_argument("--explain", action="store_true",
                   help="with activation_checkpoint.mode auto: the fastest fit (or smallest peak) of every memory feature set")
    return p.parse_known_args(argv)


def check_args(args) -> None:
    """The planner's own flags, before the config: one line naming the flag."""
    for flag, value in (("--ngpu", args.ngpu), ("--gpus-per-host", args.gpus_per_host)):
        if value < 1:
            raise ConfigError(f"{flag} {value} must be >= 1")
    for flag, value in (("--gpu-mem-gib", args.gpu_mem_gib), ("--host-mem-gib", args.host_mem_gib)):
        if not 0 < value < float("inf"):
            raise ConfigError(f"{flag} {value:g} must be a positive number of GiB")


def plan_job(config_args: list[str], ngpu: int, gpu_bytes: float):
    """The job's model, mesh, settings (auto's choice under activation_checkpoint.mode = "auto",
    within gpu_bytes less auto.MARGIN) and the planner's layout of them, as on the GPUs."""
    job_config = parse_config(config_args)
    _, model_args = model_spec_and_args(job_config)
    dims = ParallelDims.from_config(job_config.parallelism, ngpu, model_args.n_heads, model_args.n_kv_heads)
    settings = model_settings(job_config, model_args, dims, device_type="cuda", budget_bytes=gpu_bytes * (1 - MARGIN))
    training = job_config.training
    layout = layout_for(settings, dims, training.seq_len, training.local_batch_size)
    return job_config, model_args, dims, settings, layout


def explain(job_config, model_args, dims, gpu_bytes: float) -> None:
    """What auto weighed: per memory feature set, its fastest block mix that fits (or its smallest peak)."""
    base = model_settings(job_config, model_args, dims, device_type="cuda", budget_bytes=gpu_bytes)
    table = auto_candidates(job_config, model_args, dims, base, gpu_bytes * (1 - MARGIN))
    print(f"auto: the fastest settings whose planned peak fits {gpu_bytes * (1 - MARGIN) / GIB:.1f} GiB "
          f"({gpu_bytes / GIB:g} less {MARGIN:.0%}); estimated step time ranks them")
    print(f"  {'peak GiB':>9} {'est. s':>8}  settings")
    for choice in table:
        mark = "" if choice.peak <= gpu_bytes * (1 - MARGIN) else "  (does not fit)"
        print(f"  {choice.peak / GIB:>9.1f} {choice.seconds:>8.3f}  {choice.settings.describe()}{mark}")


def report(job_config, model_args, settings, layout, args) -> None:
    device, host = plan_memory(model_args, layout)
    gpu_budget, host_budget = args.gpu_mem_gib * GIB, args.host_mem_gib * GIB
    gpus_per_host = min(args.ngpu, args.gpus_per_host)
    print(f"{job_config.model.name} {job_config.model.flavor}: {model_args.num_params() / 1e9:.2f}B params | "
          f"seq_len {layout.seq_len} x batch {layout.batch} | {args.ngpu} GPU: dp_shard {layout.dp_shard} cp {layout.cp} "
          f"tp {layout.tp} | {settings.describe()}")
    for name, size in device.items():
        print(f"  {name:<28}{size / GIB:>9.2f} GiB" + ("" if name != "peak" else f"   (budget {args.gpu_mem_gib:g})"))
    for name, size in host.items():
        print(f"  host: {name:<22}{size / GIB:>9.2f} GiB per GPU")
    host_total = sum(host.values()) * gpus_per_host
    if device["peak"] > gpu_budget:
        print(f"does not fit: peak {device['peak'] / GIB:.1f} GiB > {args.gpu_mem_gib:g} GiB per GPU; "
              f"largest term: {largest_term(device)} ({device[largest_term(device)] / GIB:.1f} GiB)")
    elif host_total > host_budget:
        print(f"does not fit: host {host_total / GIB:.0f} GiB for {gpus_per_host} GPUs > {args.host_mem_gib:g} GiB per node; "
              f"largest term: host {largest_term(host)}")
    else:
        print(f"fits: {device['peak'] / GIB:.1f} of {args.gpu_mem_gib:g} GiB per GPU, host {host_total / GIB:.0f} of "
              f"{args.host_mem_gib:g} GiB per node")
    if args.max_seq:
        longest = longest_seq(model_args, dataclasses.replace(layout, batch=1), gpu_budget, host_budget, gpus_per_host)
        print(f"longest training.seq_len that fits (batch 1, multiples of {1024 * layout.tp * layout.cp}): {longest:,}")


def main(argv: list[str]) -> None:
    args, config_args = parse_args(argv)
    check_args(args)
    job_config, model_args, dims, settings, layout = plan_job(config_args, args.ngpu, args.gpu_mem_gib * GIB)
    if args.explain and job_config.activation_checkpoint.mode == "auto":
        explain(job_config, model_args, dims, args.gpu_mem_gib * GIB)
    report(job_config, model_args, settings, layout, args)


if __name__ == "__main__":
    run_command(main)
