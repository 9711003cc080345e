"""Long-context evaluation: loss by position and passkey retrieval, on any dp x cp layout.

    python scripts/eval_long.py --model-dir HF_DIR --corpus HELD_OUT.jsonl --length 32768
    torchrun --nproc_per_node 8 scripts/eval_long.py --model-dir HF_DIR --corpus BOOKS.jsonl --length 131072 \\
        --parallelism.context_parallel_degree 8
    python scripts/eval_long.py --job.config_file CONFIG --checkpoint.enable ...   # the run's own DCP checkpoint
    (or --checkpoint.initial_load_path DCP_OR_HF_DIR [--checkpoint.initial_load_in_hf]; no checkpoint: random init)

1. Loss by position: rows of --length tokens cut from the corpus (documents back to back, EOS
   between them, one attention span, so give documents at least --length long for a clean curve),
   mean next-token loss per position bucket 0-4K, 4-8K, 8-16K, ... (the first bucket is --length/16
   when that is smaller). A model that uses its context keeps lowering the loss in later buckets.
2. Passkey retrieval (Mohtashami & Jaggi 2023, arXiv:2305.16300): a random 5-digit key hidden at
   each --depths fraction of filler text of each --passkey-lengths, followed by "What is the pass
   key? The pass key is"; a trial passes when every key token is the argmax next token (teacher
   forced). Printed as a length x depth table of accuracy and drawn as a heat map.

Both use the job config's model, tokenizer (model.hf_assets_path) and layout; --out-dir gets
eval_long.json (every number printed) and passkey.png (needs matplotlib). Tensor parallel is not
supported here: context parallel is what splits a long row.
"""

import argparse
import json
import os
import random

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longctx.base import IGNORE_INDEX, ConfigError
from longctx.checkpoint.source import weight_source
from longctx.config import parse_config
from longctx.data.packing import collate, pack_row
from longctx.launch import distributed, run_command, validate
from longctx.modeling import build_model, hf_folder_args

INTRO = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there."
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


def bucket_edges(length: int, first: int = 4096) -> list[int]:
    """[0, b, 2b, 4b, ..., length] with b = min(first, length // 16): doubling buckets up to the length."""
    edge, edges = max(1, min(first, length // 16)), [0]
    while edge < length:
        edges.append(edge)
        edge *= 2
    return edges + [length]


def corpus_rows(recipe, length: int, n_rows: int) -> list[tuple[list[int], list[int]]]:
    """n_rows rows of `length` tokens from the corpus's documents in order (EOS-joined)."""
    stream, doc = [], 0
    while len(stream) < n_rows * length + 1:
        if doc == len(recipe.documents):
            raise ConfigError(f"--corpus holds {len(stream)} tokens, fewer than --rows {n_rows} x --length {length} + 1")
        stream += recipe.encode(recipe.documents[doc])[0]
        doc += 1
    rows = [stream[i * length : (i + 1) * length + 1] for i in range(n_rows)]
    return [(row[:-1], row[1:]) for row in rows]


def passkey_row(tokenizer, length: int, depth: float, key: int) -> tuple[list[int], list[int]]:
    """(tokens, labels) of `length` tokens: the key at `depth` of the filler; only the answer is labelled."""
    intro, needle = tokenizer.encode(INTRO), tokenizer.encode(NEEDLE.format(key=key))
    question, answer = tokenizer.encode(QUESTION), tokenizer.encode(f" {key}")
    room = length - len(intro) - len(needle) - len(question) - len(answer)
    if room < 0:
        raise ConfigError(f"--passkey-lengths {length} is shorter than the passkey prompt itself ({length - room} tokens)")
    filler = tokenizer.encode(FILLER)
    filler = (filler * (room // len(filler) + 1))[:room]
    before = round(depth * room)
    tokens = intro + filler[:before] + needle + filler[before:] + question + answer
    labels = [IGNORE_INDEX] * (length - len(answer) - 1) + answer + [IGNORE_INDEX]  # tokens[i] predicts labels[i]
    return tokens, labels


def token_scores(h, output, labels, chunk_size: int) -> torch.Tensor:
    """Model head: per local token (log p(label), label is the argmax), [B, T, 2] fp32, chunk by
    chunk so the [T, vocab] logits never exist at once."""
    scores = []
    for h_chunk, label_chunk in zip(h.split(chunk_size, dim=1), labels.split(chunk_size, dim=1)):
        logits = output(h_chunk).float()
        logprob = -F.cross_entropy(logits.transpose(1, 2), label_chunk, ignore_index=IGNORE_INDEX, reduction="none")
        scores.append(torch.stack([logprob, (logits.argmax(-1) == label_chunk).float()], dim=-1))
    return torch.cat(scores, dim=1)


@torch.no_grad()
def score_rows(model, rows: list[tuple[list[int], list[int]]], parallel_dims, pad_id: int, chunk_size: int, device) -> dict:
    """{row index: [n, 2] scores of its tokens} for this rank's dp group's rows. Every rank runs
    the same number of forwards (FSDP gathers collectively): a dp group without a row scores an empty one."""
    dp, dp_rank, cp = parallel_dims.dp, parallel_dims.mesh("dp").get_local_rank(), parallel_dims.cp
    results = {}
    for first in range(0, len(rows), dp):
        index = first + dp_rank
        tokens, labels = rows[index] if index < len(rows) else ([pad_id], [IGNORE_INDEX])
        row = pack_row([(tokens, labels)], parallel_dims.padded_len(len(tokens)), pad_id)
        batch = parallel_dims.shard_for_cp({k: v.to(device) for k, v in collate([row]).items()})
        head = lambda h, output: token_scores(h, output, batch["labels"], chunk_size)  # noqa: E731
        # No document mask: a row is one document with padding only at its end, so plain causal
        # attention is exact for every real token (and runs the fast SDPA kernels, nothing to compile).
        local = model(batch["input_ids"], batch["position_ids"], head=head)[0]  # [T/cp, 2]
        if cp > 1:
            chunks = [torch.empty_like(local) for _ in range(cp)]
            dist.all_gather(chunks, local.contiguous(), group=parallel_dims.mesh("cp").get_group())
            local = torch.cat(chunks)
        if index < len(rows):
            results[index] = local[: len(tokens)].cpu()
    return results


def bucket_losses(scores: list[torch.Tensor], edges: list[int]) -> list[dict]:
    logprobs = torch.stack([s[:, 0] for s in scores])  # [rows, length]
    return [{"from": lo, "to": hi, "tokens": logprobs[:, lo:hi].numel(), "loss": -logprobs[:, lo:hi].mean().item()}
            for lo, hi in zip(edges, edges[1:])]


def passkey_accuracy(scores: dict, cells: list[tuple[int, float, int]], rows) -> dict[tuple[int, float], float]:
    """(length, depth) -> fraction of trials whose key tokens are all the argmax."""
    hits: dict[tuple[int, float], list[bool]] = {}
    for i, (length, depth, _) in enumerate(cells):
        answer = torch.tensor(rows[i][1]) != IGNORE_INDEX
        hits.setdefault((length, depth), []).append(bool(scores[i][answer, 1].all()))
    return {cell: sum(h) / len(h) for cell, h in hits.items()}


def fmt_tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def report(buckets: list[dict], accuracy: dict, lengths: list[int], depths: list[float]) -> str:
    lines = ["loss by position", f"{'positions':>16} {'tokens':>10} {'loss':>8}"]
    lines += [f"{fmt_tokens(b['from']) + '-' + fmt_tokens(b['to']):>16} {b['tokens']:>10} {b['loss']:>8.4f}" for b in buckets]
    lines += ["", "passkey accuracy (rows: length, columns: depth)", f"{'length':>8}" + "".join(f"{d:>7.2f}" for d in depths)]
    lines += [f"{fmt_tokens(n):>8}" + "".join(f"{accuracy[(n, d)]:>7.2f}" for d in depths) for n in lengths]
    return "\n".join(lines)


def save_heat_map(path: str, accuracy: dict, lengths: list[int], depths: list[float]) -> str:
    try:
        import matplotlib
    except ImportError:
        return f"matplotlib is not installed: no heat map (pip install matplotlib); the table is in {os.path.dirname(path)}/eval_long.json"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [[accuracy[(n, d)] for d in depths] for n in lengths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(depths), 1.0 + 0.6 * len(lengths)))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_yticks(range(len(lengths)), [fmt_tokens(n) for n in lengths])
    ax.set_xlabel("passkey depth")
    ax.set_ylabel("context length (tokens)")
    for y, row in enumerate(grid):
        for x, value in enumerate(row):
            ax.text(x, y, f"{value:.2f}", ha="center", va="center")
    fig.colorbar(image, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"wrote {path}"


def evaluate(job_config, job, args, device) -> dict | None:
    """Both evaluations; the results on rank 0, None elsewhere (a process group must exist)."""
    spec, model_args, parallel_dims, recipe, settings = job.spec, job.model_args, job.parallel_dims, job.recipe, job.settings
    if parallel_dims.tp > 1:
        raise ConfigError("eval_long.py runs dp and cp layouts; use parallelism.context_parallel_degree to split long rows")
    # With checkpoint.enable, the run's own latest (or load_step) checkpoint, weights only.
    model = build_model(spec, model_args, parallel_dims, settings, device, weight_source(job_config).model_only()).eval()
    rows = corpus_rows(recipe, args.length, args.rows)
    rng = random.Random(args.seed)
    cells = [(n, d, rng.randrange(10000, 100000)) for n in args.passkey_lengths for d in args.depths for _ in range(args.trials)]
    rows += [passkey_row(recipe.tokenizer, n, d, key) for n, d, key in cells]
    scores = score_rows(model, rows, parallel_dims, recipe.tokenizer.eos_id, job_config.recipe.loss_chunk_size, device)
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(scores, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    scores = [s for part in gathered for s in part.items()]
    scores = [s for _, s in sorted(dict(scores).items())]
    buckets = bucket_losses(scores[: args.rows], bucket_edges(args.length, args.first_bucket))
    accuracy = passkey_accuracy(scores[args.rows :], cells, rows[args.rows :])
    return {"length": args.length, "rows": args.rows, "buckets": buckets,
            "passkey": [{"length": n, "depth": d, "accuracy": a} for (n, d), a in accuracy.items()]}


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="Hugging Face model folder (config.json, safetensors, tokenizer)")
    parser.add_argument("--corpus", help="held-out documents (JSON lines/text/parquet; default: training.dataset_path)")
    parser.add_argument("--length", type=int, default=32768, help="tokens per row of the loss-by-position curve")
    parser.add_argument("--rows", type=int, default=4, help="rows of --length tokens averaged per bucket")
    parser.add_argument("--first-bucket", type=int, default=4096, help="the first position bucket's width")
    parser.add_argument("--passkey-lengths", type=int, nargs="+", help="default: --length / 8, / 4, / 2, and --length")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--trials", type=int, default=4, help="random keys per (length, depth)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", help="default: <job.dump_folder>/eval_long")
    args, overrides = parser.parse_known_args(argv)
    args.passkey_lengths = args.passkey_lengths or [args.length // 8, args.length // 4, args.length // 2, args.length]
    if not args.model_dir and not any(a.split("=")[0] == "--job.config_file" for a in overrides):
        raise ConfigError("give --model-dir HF_DIR, or --job.config_file CONFIG with the checkpoint to evaluate")
    if min([args.length, args.rows, args.first_bucket, args.trials, *args.passkey_lengths]) <= 0:
        raise ConfigError("--length, --rows, --first-bucket, --trials and --passkey-lengths must be positive")
    if not all(0 <= d <= 1 for d in args.depths):
        raise ConfigError(f"--depths {args.depths} must lie in [0, 1] (0: the key right after the intro, 1: right before the question)")
    # Forward only: compiling every distinct row length would cost more than it saves.
    config_args = (hf_folder_args(args.model_dir) if args.model_dir else []) + ["--compile.no-enable"] + overrides
    config_args += ["--recipe.name", "pretrain"] + (["--training.dataset_path", args.corpus] if args.corpus else [])
    return args, parse_config(config_args)


def main(argv: list[str]) -> None:
    args, job_config = parse_args(argv)
    job = validate(job_config)
    with distributed(job_config) as device:
        results = evaluate(job_config, job, args, device)
        if results is not None:
            out_dir = args.out_dir or os.path.join(job_config.job.dump_folder, "eval_long")
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "eval_long.json"), "w") as f:
                json.dump(results, f, indent=2)
            accuracy = {(p["length"], p["depth"]): p["accuracy"] for p in results["passkey"]}
            print(report(results["buckets"], accuracy, args.passkey_lengths, args.depths), flush=True)
            print(save_heat_map(os.path.join(out_dir, "passkey.png"), accuracy, args.passkey_lengths, args.depths), flush=True)


if __name__ == "__main__":
    run_command(main)
