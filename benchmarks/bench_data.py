"""The data path on CPU: rows per second per rank, on-the-fly vs tokenized, and whether a step waits on data.

    python benchmarks/bench_data.py [--corpus assets/debug/corpus.jsonl] [--seq-len 131072] [--dp 1 8 64] \\
        [--step-s 1.0] [--steps 6]

Rank 0 of a dp group, one row per rank per step (global batch = dp rows). "rows per
CPU-second" times StepLoader.build_step alone, in CPU time (other jobs on the machine do not
count): the on-the-fly path encodes the whole global batch on every rank, so its cost grows with
dp; the tokenized path reads this rank's rows only. "blocked" runs the real StepLoader (its
thread) against a simulated step of --step-s seconds and reports the time next_step waited,
first step (nothing built yet) apart from the rest. The corpus repeats as often as the rows need
(epochs), so a small one serves. The on-the-fly path is skipped above dp 8 (its cost is dp times
its dp-1 cost) and runs 2 steps.
"""

import argparse
import os
import tempfile
import time

import torch

from longctx.config import parse_config
from longctx.data.loader import RowSchedule, StepLoader
from longctx.data.tokenize_corpus import tokenize_corpus
from longctx.recipes import build_recipe


def build_rate(recipe, seq_len: int, dp: int, steps: int) -> float:
    """This rank's rows per CPU-second of StepLoader.build_step, no thread: CPU time, so that other
    jobs on the machine do not count (one thread: torch's, and a single encode is one thread)."""
    loader = StepLoader(recipe.build_stream(), RowSchedule.constant(seq_len, 1), 1, dp, dp, 0)
    loader.build_step(1)  # warm-up: page cache, first encodes
    start = time.process_time()
    for step in range(2, steps + 2):
        loader.build_step(step)
    return steps / (time.process_time() - start)


def prefetch_waits(recipe, seq_len: int, dp: int, steps: int, step_s: float) -> tuple[float, float]:
    """(seconds blocked on the first step, most seconds blocked on any later step)."""
    loader = StepLoader(recipe.build_stream(), RowSchedule.constant(seq_len, 1), 1, dp, dp, 0)
    waits = []
    for step in range(1, steps + 1):
        before = loader.wait_seconds
        loader.next_step(step)
        waits.append(loader.wait_seconds - before)
        time.sleep(step_s)  # the accelerator's step: the host thread waits on the device, GIL released
    loader.close()
    return waits[0], max(waits[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="assets/debug/corpus.jsonl")
    parser.add_argument("--hf-assets-path", default="assets/debug", help="the tokenizer's folder")
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--step-s", type=float, default=1.0, help="simulated step time (a real 128K step is longer)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as one rank of several on a host
    config = ["--model.hf_assets_path", args.hf_assets_path, "--training.seq_len", str(args.seq_len)]
    with tempfile.TemporaryDirectory() as tmp:
        tokens_dir = os.path.join(tmp, "tokens")
        start = time.perf_counter()
        metadata = tokenize_corpus(args.corpus, tokens_dir, args.hf_assets_path, "auto", "text", os.cpu_count(), 2**30)
        tokenize_s = time.perf_counter() - start
        print(f"\ntokenize_corpus.py: {metadata['num_tokens']:,} tokens in {tokenize_s:.1f} s with {os.cpu_count()} workers "
              f"({metadata['num_tokens'] / tokenize_s:,.0f} tokens/s, start-up included)\n")
        recipes = {"on the fly": build_recipe(parse_config(config + ["--training.dataset_path", args.corpus])),
                   "tokenized": build_recipe(parse_config(config + ["--training.dataset_path", tokens_dir]))}
        print(f"| path | dp | rows per CPU-second per rank ({args.seq_len:,}-token rows) | blocked, first step (s) | "
              f"blocked, worst later step (s), {args.step_s:g} s steps |")
        print("|---|---|---|---|---|")
        for dp in args.dp:
            for name, recipe in recipes.items():
                if name == "on the fly" and dp > 8:
                    continue  # minutes per step: its cost is dp times that of dp 1
                steps = 2 if name == "on the fly" else args.steps
                rate = build_rate(recipe, args.seq_len, dp, steps)
                first, worst = prefetch_waits(recipe, args.seq_len, dp, steps, args.step_s)
                print(f"| {name} | {dp} | {rate:.3g} | {first:.3f} | {worst:.4f} |", flush=True)


if __name__ == "__main__":
    main()
