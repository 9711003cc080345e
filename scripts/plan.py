"""Each GPU's memory for a training layout, by term, before launch: on CPU, in seconds, no model built.

    python scripts/plan.py --job.config_file train_configs/qwen3_8b.toml --ngpu 8
    python scripts/plan.py --job.config_file train_configs/qwen3_bench.toml --ngpu 1 --max-seq \\
        --activation_checkpoint.mode full --activation_checkpoint.cpu_offload --gpu-mem-gib 140

Every other argument is a job-config override, as for train.py. The terms and their assumptions
are in components/memory_plan.py; how close they come to torch.cuda.max_memory_allocated is the
planned-vs-measured table of docs/performance.md (scripts/bench_memory.py measures it).
"""

import argparse
import dataclasses

from longctx.base import ConfigError
from longctx.config import parse_config
from longctx.launch import run_command
from longctx.modeling import model_spec_and_args
from longctx.parallelisms.parallel_dims import ParallelDims
from longctx.planner.memory import GIB, largest_term, layout_from_config, longest_seq, plan_memory


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ngpu", type=int, default=1, help="processes of the job (the world size)")
    p.add_argument("--max-seq", action="store_true", help="also find the longest training.seq_len that fits both budgets")
    p.add_argument("--gpu-mem-gib", type=float, default=140.0, help="device memory per GPU (H200: 140; H100: 79)")
    p.add_argument("--host-mem-gib", type=float, default=1800.0, help="host memory per node")
    p.add_argument("--gpus-per-host", type=int, default=8, help="GPUs sharing one node's host memory")
    return p.parse_known_args(argv)


def check_args(args) -> None:
    """The planner's own flags, before the config: one line naming the flag."""
    for flag, value in (("--ngpu", args.ngpu), ("--gpus-per-host", args.gpus_per_host)):
        if value < 1:
            raise ConfigError(f"{flag} {value} must be >= 1")
    for flag, value in (("--gpu-mem-gib", args.gpu_mem_gib), ("--host-mem-gib", args.host_mem_gib)):
        if not 0 < value < float("inf"):
            raise ConfigError(f"{flag} {value:g} must be a positive number of GiB")


def layout_for(config_args: list[str], ngpu: int):
    job_config = parse_config(config_args)
    _, model_args = model_spec_and_args(job_config)
    p = job_config.parallelism
    try:
        dims = ParallelDims(dp_replicate=p.data_parallel_replicate_degree, dp_shard=p.data_parallel_shard_degree,
                            cp=p.context_parallel_degree, tp=p.tensor_parallel_degree, world_size=ngpu,
                            cp_ulysses=p.context_parallel_ulysses_degree).for_heads(model_args.n_heads, model_args.n_kv_heads)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return job_config, model_args, layout_from_config(job_config, dims)


def report(job_config, model_args, layout, args) -> None:
    device, host = plan_memory(model_args, layout)
    gpu_budget, host_budget = args.gpu_mem_gib * GIB, args.host_mem_gib * GIB
    gpus_per_host = min(args.ngpu, args.gpus_per_host)
    print(f"{job_config.model.name} {job_config.model.flavor}: {model_args.num_params() / 1e9:.2f}B params | "
          f"seq_len {layout.seq_len} x batch {layout.batch} | {args.ngpu} GPU: dp_shard {layout.dp_shard} cp {layout.cp} "
          f"tp {layout.tp} | AC {layout.ac}, activation offload {layout.activation_offload}, mlp tiles "
          f"{layout.mlp_chunk or 'off'}, fp32 state on host {layout.cpu_offload}")
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
    job_config, model_args, layout = layout_for(config_args, args.ngpu)
    report(job_config, model_args, layout, args)


if __name__ == "__main__":
    run_command(main)
