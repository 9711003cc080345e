"""Straggler ratio of dp ranks on long-tail data: rows dealt by position against training.balance = "flops".

    python benchmarks/bench_balance.py                    # one GPU: Qwen3-0.6B, 64K rows, dp 8, cp 1 and 2
    python benchmarks/bench_balance.py --packing whole    # SFT's packing: documents whole, re-packed by cost
    python benchmarks/bench_balance.py --smoke            # CPU, tiny model: checks the script
    python benchmarks/bench_balance.py --plan-only        # any machine: the cost model's straggler ratios, no timing

Documents of log-normal length (256 to 64K tokens) are packed into 64K rows by the training
streams themselves (--packing split: pretraining, documents split at row ends; whole: SFT and
policy, documents whole), one global batch of dp x grad_accum x local_batch rows per step, and
StepLoader.arrange deals them. Every distinct row is timed once on this GPU (forward + backward
through the recipe's loss_sum, as train_step runs it: compiled blocks, activation checkpointing,
flex-attention document masks), and a rank's micro-batch takes the sum of its rows' times.

Ranks meet at every micro-batch (FSDP's per-block all-gathers and reduce-scatters), so a step
lasts the sum over micro-batches of the slowest rank's time. "straggler" is that over the mean
rank's time (1.00: no rank ever waits); "gain" the step time dealt by position over balanced,
measured, and as the cost model planned it. cp 2 times each row as one rank of its cp group does
it under Ulysses (every token's attention for half the heads, the linear layers for half the
tokens): through a model with half the heads, MLP width and vocabulary, the same flops per rank,
all-to-alls not included. The cost model's fit: least squares seconds = alpha * tokens + beta *
sum(L^2) over the timed rows, beta/alpha against the model's b/a, and the largest error of the
planned cost (one scale factor for all rows) against a row's measured time.
"""

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch
from bench_systems import Ours, free, sync

from longctx import train
from longctx.checkpoint.hf import hf_config
from longctx.config import parse_config
from longctx.data.balance import DocumentCost, synced_cost
from longctx.data.loader import RowSchedule, StepLoader
from longctx.data.packing import PackedStream, collate, next_token_labels
from longctx.launch import distributed
from longctx.modeling import model_spec_and_args
from longctx.parallelisms.settings import forward_context, loss_context

SMOKE = ["--flavor", "debugmodel", "--layers", "1", "--seq", "256", "--min-doc", "16", "--median-doc", "48", "--dp", "4",
         "--grad-accum", "2", "--ac", "none", "--no-compile", "--packing", "split", "whole"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flavor", default="0.6B", help="Qwen3 size (models/qwen3/__init__.py)")
    p.add_argument("--layers", type=int, default=0, help="blocks of the model (0: the flavor's); fewer for a quicker run")
    p.add_argument("--seq", type=int, default=65536, help="tokens per row")
    p.add_argument("--min-doc", type=int, default=256, help="shortest document; the longest is --seq")
    p.add_argument("--median-doc", type=int, default=4096, help="median of the log-normal document length")
    p.add_argument("--sigma", type=float, default=1.5, help="sigma of the log-normal (of ln length)")
    p.add_argument("--dp", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step")
    p.add_argument("--local-batch", type=int, default=1, help="rows per micro-batch")
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2], help="context-parallel degrees to simulate")
    p.add_argument("--packing", nargs="+", default=["split"], choices=("split", "whole"))
    p.add_argument("--steps", type=int, default=1, help="global batches")
    p.add_argument("--ac", default="full", choices=("none", "full", "selective"), help="activation checkpointing")
    p.add_argument("--no-compile", action="store_true", help="eager blocks (CPU)")
    p.add_argument("--config", default="train_configs/qwen3_bench.toml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plan-only", action="store_true", help="the cost model's figures only: no model, no timing")
    p.add_argument("--smoke", action="store_true", help="CPU-sized run of every path: " + " ".join(SMOKE))
    args = p.parse_args(argv)
    return p.parse_args(SMOKE + argv) if args.smoke else args


# ---------------------------------------------------------------- the data


def long_tail_stream(args, packing: str, vocab: int) -> PackedStream:
    """Endless log-normal documents of random tokens (zeros with --plan-only: only lengths count),
    packed by the training streams' own code."""
    def encode(index: int):
        rng = random.Random(args.seed * 1_000_003 + index)
        length = min(max(round(math.exp(rng.gauss(math.log(args.median_doc), args.sigma))), args.min_doc), args.seq)
        tokens = [0] * length if args.plan_only else [rng.randrange(vocab) for _ in range(length)]
        return tokens, next_token_labels(tokens)

    return PackedStream(range(10**6), encode, pad_id=0, split_documents=packing == "split")


def global_batches(args, packing: str, vocab: int, cost: DocumentCost):
    """(stream, [(rows by position, rows balanced)] per step): each a list of RowPlans in
    position order, micro-batch m of dp rank r at [(m*dp + r)*b, (m*dp + r + 1)*b)."""
    stream = long_tail_stream(args, packing, vocab)
    batch = args.dp * args.grad_accum * args.local_batch
    schedule = RowSchedule.constant(args.seq, 1)
    dealer = StepLoader(stream, schedule, args.local_batch, batch, args.dp, 0, balance=cost)
    steps = []
    for step in range(1, args.steps + 1):
        plans = stream.plan_rows(batch, schedule.at(step))
        steps.append((plans, dealer.arrange(plans, schedule.at(step))))
    return stream, steps


# ---------------------------------------------------------------- the model and its timing


def cp_share_flavor(model_args, cp: int, folder: str, spec) -> str:
    """An HF config folder for one cp rank's share of every row: heads, kv heads, MLP width and
    vocabulary divided by cp (Ulysses gives a rank all tokens of H/cp heads and T/cp tokens of
    the rest: the same flops)."""
    share = dataclasses.replace(model_args, n_heads=model_args.n_heads // cp, n_kv_heads=max(model_args.n_kv_heads // cp, 1),
                                hidden_dim=model_args.hidden_dim // cp, vocab_size=model_args.vocab_size // cp)
    path = os.path.join(folder, f"cp{cp}")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config(spec, share, torch.bfloat16, None), f)
    return path


def build_system(args, flavor: str, device) -> Ours:
    argv = ["--job.config_file", args.config, "--model.flavor", flavor, "--training.seq_len", str(args.seq),
            "--activation_checkpoint.mode", args.ac, *(["--compile.no-enable"] if args.no_compile else [])]
    return Ours(argv, device)


def time_row(system: Ours, row: dict, device) -> float:
    """Seconds of one row's forward and backward, the calls train_step makes for a micro-batch."""
    [microbatch] = train.on_device([collate([row])], system.parallel_dims, device)
    sync(device)
    start = time.perf_counter()
    with loss_context(system.settings):
        with forward_context(system.settings, device.type):
            loss_sum, _ = system.recipe.loss_sum(system.model, microbatch, system.settings.loss_chunk)
        loss_sum.backward()
    sync(device)
    return time.perf_counter() - start


def time_rows(system: Ours, stream: PackedStream, plans: list, args, device) -> dict[tuple, float]:
    """Seconds per distinct row (by its pieces), the first row once more ahead (compilation)."""
    row = RowSchedule.constant(args.seq, 1).at(1)
    time_row(system, stream.build_row(plans[0], row), device)
    seconds = {}
    with train.ScheduledGC(1):  # no collection pauses a timed row
        for plan in plans:
            if plan.lengths not in seconds:
                seconds[plan.lengths] = time_row(system, stream.build_row(plan, row), device)
    return seconds


# ---------------------------------------------------------------- the table


def straggler(costs: list[float], args) -> float:
    """The synced step (slowest rank at every micro-batch) over the mean rank's work."""
    return synced_cost(costs, args.dp, args.local_batch) / (sum(costs) / args.dp)


def fit(rows: list[tuple], seconds: list[float], padded: int) -> tuple[float, float]:
    """Least squares seconds = alpha * tokens + beta * sum of squared piece lengths (padding too)."""
    squares = [sum(n * n for n in lengths) + (padded - sum(lengths)) ** 2 for lengths in rows]
    (alpha, beta), *_ = np.linalg.lstsq(np.array([[padded, q] for q in squares], dtype=float), np.array(seconds), rcond=None)
    return alpha, beta


ORDERS = ("position", "balanced")


def per_order(steps, row_cost) -> dict[str, list[list[float]]]:
    """{order: per step, each row's cost} for rows dealt by position and balanced."""
    return {name: [[row_cost(p) for p in pair[i]] for pair in steps] for i, name in enumerate(ORDERS)}


def step_costs(costs: dict[str, list[list[float]]], args) -> dict[str, float]:
    """{order: the synced steps' total}: at each micro-batch the slowest rank."""
    return {name: sum(synced_cost(c, args.dp, args.local_batch) for c in costs[name]) for name in costs}


def measure(args, packing: str, cp: int, system: Ours, cost: DocumentCost, share_cost: DocumentCost, device) -> dict:
    stream, steps = global_batches(args, packing, system.model_args.vocab_size, cost)  # the same lengths under every cp
    seconds = time_rows(system, stream, [plan for pair in steps for plans in pair for plan in plans], args, device)
    timed = per_order(steps, lambda p: seconds[p.lengths])
    step, plan_step = step_costs(timed, args), step_costs(per_order(steps, lambda p: cost.row(p.lengths, args.seq)), args)
    rows, times = list(seconds), list(seconds.values())
    alpha, beta = fit(rows, times, args.seq)
    scale = sum(times) / sum(share_cost.row(r, args.seq) for r in rows)
    error = max(abs(scale * share_cost.row(r, args.seq) - t) / t for r, t in zip(rows, times))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {
        "packing": packing, "cp": cp, "rows": len(rows),
        "straggler position": mean([straggler(t, args) for t in timed["position"]]),
        "straggler balanced": mean([straggler(t, args) for t in timed["balanced"]]),
        "step s position": step["position"], "step s balanced": step["balanced"],
        "gain": step["position"] / step["balanced"], "planned gain": plan_step["position"] / plan_step["balanced"],
        "b/a model": share_cost.quadratic / share_cost.linear, "b/a fit": beta / alpha, "row error": error,
    }


def plan(args, packing: str, cost: DocumentCost) -> dict:
    """The cost model's figures alone: straggler ratios and step gain as planned (cp divides every
    row alike, so they hold for every cp)."""
    _, steps = global_batches(args, packing, 2, cost)
    planned = per_order(steps, lambda p: cost.row(p.lengths, args.seq))
    step = step_costs(planned, args)
    ratios = {order: [straggler(c, args) for c in planned[order]] for order in ORDERS}
    return {"packing": packing, **{f"straggler {order}": sum(r) / len(r) for order, r in ratios.items()},
            **{f"worst {order}": max(r) for order, r in ratios.items()},
            "planned gain": step["position"] / step["balanced"]}


def print_plan(results: list[dict], args, cost: DocumentCost) -> None:
    print(f"\nplanned only (the cost model, no timing): Qwen3-{args.flavor}, rows of {args.seq} tokens, documents log-normal "
          f"{args.min_doc}..{args.seq} (median {args.median_doc}, sigma {args.sigma}), dp {args.dp} x {args.grad_accum} "
          f"micro-batches x {args.local_batch} rows, {args.steps} step(s); b/a = {cost.quadratic / cost.linear:.3g}")
    header = ("packing", "straggler position", "straggler balanced", "worst position", "worst balanced", "planned gain")
    print(" | ".join(header))
    for r in results:
        print(" | ".join(f"{r[key]:.2f}" if isinstance(r[key], float) else str(r[key]) for key in header))


def print_table(results: list[dict], args, device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\nQwen3-{args.flavor}{f' ({args.layers} layers)' if args.layers else ''} on {name}, rows of {args.seq} tokens, "
          f"documents log-normal {args.min_doc}..{args.seq} (median {args.median_doc}, sigma {args.sigma}), dp {args.dp} x "
          f"{args.grad_accum} micro-batches x {args.local_batch} rows, {args.steps} step(s), ac={args.ac}")
    header = ("packing", "cp", "rows", "straggler position", "straggler balanced", "step s position", "step s balanced",
              "gain", "planned gain", "b/a model", "b/a fit", "row error")
    print(" | ".join(header))
    for r in results:
        print(" | ".join(f"{r[key]:.3g}" if isinstance(r[key], float) and key.startswith("b/a") else
                         f"{r[key]:.2f}" if isinstance(r[key], float) else str(r[key]) for key in header))


def main(argv) -> None:
    args = parse_args(argv)
    flavor_argv = ["--job.config_file", args.config, "--model.flavor", args.flavor]
    job_config = parse_config(flavor_argv)
    spec, model_args = model_spec_and_args(job_config)
    if args.layers:
        model_args = dataclasses.replace(model_args, n_layers=args.layers)
    # The loader's cost model: the whole model's, whatever the cp (cp divides every row alike).
    cost = DocumentCost.from_flops_per_token(model_args.flops_per_token)
    if args.plan_only:
        print_plan([plan(args, packing, cost) for packing in args.packing], args, cost)
        return
    results = []
    with distributed(job_config) as device, tempfile.TemporaryDirectory() as folder:
        for cp in args.cp:
            flavor = cp_share_flavor(model_args, cp, folder, spec)
            system = build_system(args, flavor, device)
            share_cost = DocumentCost.from_flops_per_token(system.model_args.flops_per_token)
            for packing in args.packing:
                results.append(measure(args, packing, cp, system, cost, share_cost, device))
            del system
            free()
        print_table(results, args, device)


if __name__ == "__main__":
    main(sys.argv[1:])
