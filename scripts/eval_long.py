"""Long-context evaluation: loss by position, passkey and multi-key retrieval, on any dp x cp layout,
or the same rows in transformers.

    python scripts/eval_long.py --model-dir HF_DIR --corpus HELD_OUT.jsonl --length 32768
    torchrun --nproc_per_node 8 scripts/eval_long.py --model-dir HF_DIR --corpus BOOKS.jsonl --length 131072 \\
        --parallelism.context_parallel_degree 8
    python scripts/eval_long.py --job.config_file CONFIG --checkpoint.enable ...   # the run's own DCP checkpoint
    (or --checkpoint.initial_load_path DCP_OR_HF_DIR [--checkpoint.initial_load_in_hf]; no checkpoint: random init)
    python scripts/eval_long.py --model-dir HF_DIR --backend transformers ...      # AutoModelForCausalLM, one process

1. Loss by position: rows of --length tokens cut from the corpus (documents back to back, EOS
   between them, one attention span, so give documents at least --length long for a clean curve),
   mean next-token loss per position bucket 0-4K, 4-8K, 8-16K, ... (the first bucket is --length/16
   when that is smaller). A model that uses its context keeps lowering the loss in later buckets.
2. Passkey retrieval (Mohtashami & Jaggi 2023, arXiv:2305.16300): a random 5-digit key hidden at
   each --depths fraction of filler text of each --retrieval-lengths, followed by "What is the pass
   key? The pass key is".
3. Multi-key retrieval (RULER's multi-key needle in a haystack, Hsieh et al. 2024, arXiv:2404.06654):
   --keys needles "The magic number of the NAME is VALUE." in natural text (the corpus, EOS
   removed), the asked one at each depth and the others at random depths, followed by "What is the
   magic number of the NAME? ...": a model must find the right key among several.
A retrieval trial passes when every answer token is the argmax next token (teacher forced); each
task prints a length x depth table of accuracy. Needles go in before the word nearest their depth.

Both backends score the same rows and write the same --out-dir/eval_long.json (every number printed
and each trial's result), so two evaluations compare number for number. longctx uses the job
config's model, tokenizer (model.hf_assets_path) and layout; transformers (--model-dir) one process
on one device. Both compute in training.mixed_precision_param on a GPU (fp32 on CPU). Draw the
JSON with scripts/plot_context_extension.py. Tensor parallel is not supported here: context
parallel is what splits a long row.
"""

import argparse
import json
import os
import random
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from longctx.base import IGNORE_INDEX, ConfigError, DataError
from longctx.checkpoint.source import weight_source
from longctx.config import parse_config
from longctx.data.packing import collate, pack_row
from longctx.data.retrieval import NAMES, TASKS, NaturalText, Words, fmt_tokens, multikey_tokens, passkey_tokens
from longctx.data.token_shards import TokenCorpus
from longctx.launch import distributed, run_command, validate
from longctx.modeling import build_model, hf_folder_args
from longctx.parallelisms.settings import forward_context


def bucket_edges(length: int, first: int = 4096) -> list[int]:
    """[0, b, 2b, 4b, ..., length] with b = min(first, length // 16): doubling buckets up to the length."""
    edge, edges = max(1, min(first, length // 16)), [0]
    while edge < length:
        edges.append(edge)
        edge *= 2
    return edges + [length]


def corpus_tokens(recipe, n_tokens: int) -> np.ndarray:
    """The corpus's first n_tokens tokens: its documents in order, each closed by EOS (a token
    folder of scripts/tokenize_corpus.py holds them so)."""
    if isinstance(recipe.documents, TokenCorpus):
        available = recipe.documents.num_tokens
        tokens = recipe.documents.span(0, min(n_tokens, available))[0] if available else np.zeros(0, np.int64)
    else:
        stream, doc = [], 0
        while len(stream) < n_tokens and doc < len(recipe.documents):
            stream += recipe.encode(recipe.documents[doc])[0]
            doc += 1
        tokens = np.array(stream[:n_tokens], dtype=np.int64)
    if len(tokens) < n_tokens:
        raise DataError(f"--corpus holds {len(tokens)} tokens, fewer than the {n_tokens} this evaluation reads "
                        "(--rows x --length + 1, or the longest --retrieval-lengths); give a larger corpus or lower them")
    return tokens


def corpus_rows(tokens: np.ndarray, length: int, n_rows: int) -> list[tuple[list[int], list[int]]]:
    """n_rows rows of `length` tokens, back to back; labels are the next token, across documents too."""
    rows = [tokens[i * length : (i + 1) * length + 1].tolist() for i in range(n_rows)]
    return [(row[:-1], row[1:]) for row in rows]


def labelled(tokens: list[int], answer_len: int) -> tuple[list[int], list[int]]:
    """(tokens, labels) with only the answer (the last answer_len tokens) labelled: tokens[i] predicts labels[i]."""
    return tokens, [IGNORE_INDEX] * (len(tokens) - answer_len - 1) + tokens[-answer_len:] + [IGNORE_INDEX]


def retrieval_rows(words: Words, haystack: NaturalText, args) -> dict[str, tuple[list, list]]:
    """task -> (cells (length, depth), rows): --trials per (length, depth), in that order. The
    passkey keys come from Random(seed) alone, so adding a task changes none of them."""
    passkey_rng, multikey_rng = random.Random(args.seed), random.Random(f"{args.seed}-multikey")
    cells = [(n, d) for n in args.retrieval_lengths for d in args.depths for _ in range(args.trials)]
    tasks = {"passkey": (cells, []), "multikey": (cells, [])}
    try:
        for n, d in cells:
            tasks["passkey"][1].append(labelled(*passkey_tokens(words, n, d, passkey_rng.randrange(10000, 100000))))
            pairs = list(zip(multikey_rng.sample(NAMES, args.keys), multikey_rng.sample(range(10000, 100000), args.keys)))
            depths = [d] + [multikey_rng.random() for _ in pairs[1:]]  # pairs[0] is asked for, at the cell's depth
            rows = multikey_tokens(words, haystack.window(multikey_rng, n), n, pairs, depths, asked=0)
            tasks["multikey"][1].append(labelled(*rows))
    except ConfigError as e:
        raise ConfigError(f"--retrieval-lengths: {e}") from None
    return tasks


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
def score_rows(model, rows: list[tuple[list[int], list[int]]], parallel_dims, settings, pad_id: int, device) -> dict:
    """{row index: [n, 2] scores of its tokens} for this rank's dp group's rows, in the settings'
    compute dtype. Every rank runs the same number of forwards (FSDP gathers collectively): a dp
    group without a row scores an empty one."""
    dp, dp_rank, cp = parallel_dims.dp, parallel_dims.mesh("dp").get_local_rank(), parallel_dims.cp
    results = {}
    for first in range(0, len(rows), dp):
        index = first + dp_rank
        tokens, labels = rows[index] if index < len(rows) else ([pad_id], [IGNORE_INDEX])
        row = pack_row([(tokens, labels)], parallel_dims.padded_len(len(tokens)), pad_id)
        batch = parallel_dims.shard_for_cp({k: v.to(device) for k, v in collate([row]).items()})
        head = lambda h, output: token_scores(h, output, batch["labels"], settings.loss_chunk)  # noqa: E731
        # No document mask: a row is one document with padding only at its end, so plain causal
        # attention is exact for every real token (and runs the fast SDPA kernels, nothing to compile).
        with forward_context(settings, device.type):
            local = model(batch["input_ids"], batch["position_ids"], head=head)[0]  # [T/cp, 2]
        if cp > 1:
            chunks = [torch.empty_like(local) for _ in range(cp)]
            dist.all_gather(chunks, local.contiguous(), group=parallel_dims.mesh("cp").get_group())
            local = torch.cat(chunks)
        if index < len(rows):
            results[index] = local[: len(tokens)].cpu()
    return results


@torch.no_grad()
def score_rows_transformers(model_dir: str, rows, dtype: torch.dtype, chunk_size: int) -> list[torch.Tensor]:
    """The same scores from transformers' AutoModelForCausalLM, one row at a time on one device."""
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    scores = []
    for tokens, labels in rows:
        h = model.model(input_ids=torch.tensor([tokens], device=device)).last_hidden_state
        scores.append(token_scores(h, model.lm_head, torch.tensor([labels], device=device), chunk_size)[0].cpu())
    return scores


def bucket_losses(scores: list[torch.Tensor], edges: list[int]) -> list[dict]:
    logprobs = torch.stack([s[:, 0] for s in scores])  # [rows, length]
    return [{"from": lo, "to": hi, "tokens": logprobs[:, lo:hi].numel(), "loss": -logprobs[:, lo:hi].mean().item()}
            for lo, hi in zip(edges, edges[1:])]


def retrieval_accuracy(scores: list[torch.Tensor], cells: list[tuple[int, float]], rows) -> list[dict]:
    """Per (length, depth): the fraction of trials whose answer tokens are all the argmax, and each trial's result."""
    hits: dict[tuple[int, float], list[bool]] = {}
    for score, cell, (_, labels) in zip(scores, cells, rows):
        answer = torch.tensor(labels) != IGNORE_INDEX
        hits.setdefault(cell, []).append(bool(score[answer, 1].all()))
    return [{"length": n, "depth": d, "accuracy": sum(h) / len(h), "hits": h} for (n, d), h in hits.items()]


def report(results: dict) -> str:
    buckets = results["buckets"]
    lines = [f"loss by position ({results['backend']})", f"{'positions':>16} {'tokens':>10} {'loss':>8}"]
    lines += [f"{fmt_tokens(b['from']) + '-' + fmt_tokens(b['to']):>16} {b['tokens']:>10} {b['loss']:>8.4f}" for b in buckets]
    for task in TASKS:
        accuracy = {(c["length"], c["depth"]): c["accuracy"] for c in results[task]}
        lengths, depths = sorted({n for n, _ in accuracy}), sorted({d for _, d in accuracy})
        lines += ["", f"{task} accuracy (rows: length, columns: depth)", f"{'length':>8}" + "".join(f"{d:>7.2f}" for d in depths)]
        lines += [f"{fmt_tokens(n):>8}" + "".join(f"{accuracy[(n, d)]:>7.2f}" for d in depths) for n in lengths]
    return "\n".join(lines)


def evaluation_rows(recipe, args) -> tuple[list, dict, list]:
    """(loss rows, task -> (cells, rows), every row in scoring order), the same for every backend and layout."""
    tokens = corpus_tokens(recipe, max(args.rows * args.length + 1, max(args.retrieval_lengths)))
    words = Words(recipe.tokenizer)
    loss_rows = corpus_rows(tokens, args.length, args.rows)
    tasks = retrieval_rows(words, NaturalText(words, tokens[tokens != recipe.tokenizer.eos_id]), args)
    return loss_rows, tasks, loss_rows + [row for _, task_rows in tasks.values() for row in task_rows]


def summarize(scores: list[torch.Tensor], loss_rows: list, tasks: dict, args, backend: str) -> dict:
    """The scores of the loss rows, then of each task's rows in order -> the results."""
    results = {"backend": backend, "length": args.length, "rows": args.rows, "keys": args.keys,
               "buckets": bucket_losses(scores[: len(loss_rows)], bucket_edges(args.length, args.first_bucket))}
    done = len(loss_rows)
    for task, (cells, rows) in tasks.items():
        results[task] = retrieval_accuracy(scores[done : done + len(rows)], cells, rows)
        done += len(rows)
    return results


def evaluate(job_config, job, args, device) -> dict | None:
    """Every evaluation by longctx's model; the results on rank 0, None elsewhere (a process group must exist)."""
    spec, model_args, parallel_dims, recipe, settings = job.spec, job.model_args, job.parallel_dims, job.recipe, job.settings
    if parallel_dims.tp > 1:
        raise ConfigError("eval_long.py runs dp and cp layouts; use parallelism.context_parallel_degree to split long rows")
    loss_rows, tasks, rows = evaluation_rows(recipe, args)
    # With checkpoint.enable, the run's own latest (or load_step) checkpoint, weights only.
    model = build_model(spec, model_args, parallel_dims, settings, device, weight_source(job_config).model_only()).eval()
    scores = score_rows(model, rows, parallel_dims, settings, recipe.tokenizer.eos_id, device)
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(scores, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    scores = dict(s for part in gathered for s in part.items())
    return summarize([scores[i] for i in range(len(rows))], loss_rows, tasks, args, "longctx")


def evaluate_transformers(job_config, job, args) -> dict:
    """The same rows scored by transformers (one process, no process group)."""
    loss_rows, tasks, rows = evaluation_rows(job.recipe, args)
    dtype = getattr(torch, job_config.training.mixed_precision_param) if torch.cuda.is_available() else torch.float32
    scores = score_rows_transformers(args.model_dir, rows, dtype, job.settings.loss_chunk)
    return summarize(scores, loss_rows, tasks, args, "transformers")


def check_out_dir(path: str) -> None:
    """Before any forward: a folder that cannot be written would lose every result at the end."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--out-dir {path!r} is a file; give a folder (it gets eval_long.json)")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"--out-dir {path!r} cannot be written ({e.strerror}); give a writable folder") from None


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="Hugging Face model folder (config.json, safetensors, tokenizer)")
    parser.add_argument("--backend", choices=["longctx", "transformers"], default="longctx",
                        help="transformers: score the --model-dir folder with AutoModelForCausalLM, one process")
    parser.add_argument("--corpus", help="held-out documents (JSON lines/text/parquet, or a token folder of "
                                         "scripts/tokenize_corpus.py; default: training.dataset_path)")
    parser.add_argument("--length", type=int, default=32768, help="tokens per row of the loss-by-position curve")
    parser.add_argument("--rows", type=int, default=4, help="rows of --length tokens averaged per bucket")
    parser.add_argument("--first-bucket", type=int, default=4096, help="the first position bucket's width")
    parser.add_argument("--retrieval-lengths", type=int, nargs="+", help="default: --length / 8, / 4, / 2, and --length")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--trials", type=int, default=4, help="random keys per task, length and depth")
    parser.add_argument("--keys", type=int, default=4, help="needles per multi-key row (one of them is asked for)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", help="default: <job.dump_folder>/eval_long")
    args, overrides = parser.parse_known_args(argv)
    args.retrieval_lengths = args.retrieval_lengths or [args.length // 8, args.length // 4, args.length // 2, args.length]
    if not args.model_dir and not any(a.split("=")[0] == "--job.config_file" for a in overrides):
        raise ConfigError("give --model-dir HF_DIR, or --job.config_file CONFIG with the checkpoint to evaluate")
    if args.backend == "transformers" and (not args.model_dir or int(os.environ.get("WORLD_SIZE", 1)) > 1):
        raise ConfigError("--backend transformers scores an HF folder in one process: give --model-dir, run it with plain python")
    if min([args.length, args.rows, args.first_bucket, args.trials, *args.retrieval_lengths]) <= 0:
        raise ConfigError("--length, --rows, --first-bucket, --trials and --retrieval-lengths must be positive")
    if not all(0 <= d <= 1 for d in args.depths):
        raise ConfigError(f"--depths {args.depths} must lie in [0, 1] (0: the key right after the intro, 1: right before the question)")
    if not 1 <= args.keys <= len(NAMES):
        raise ConfigError(f"--keys {args.keys} must be between 1 and {len(NAMES)} (the names a multi-key row draws from)")
    # Forward only: compiling every distinct row length would cost more than it saves.
    config_args = (hf_folder_args(args.model_dir) if args.model_dir else []) + ["--compile.no-enable"] + overrides
    config_args += ["--recipe.name", "pretrain"] + (["--training.dataset_path", args.corpus] if args.corpus else [])
    job_config = parse_config(config_args)
    args.out_dir = args.out_dir or os.path.join(job_config.job.dump_folder, "eval_long")
    if int(os.environ.get("RANK", 0)) == 0:
        check_out_dir(args.out_dir)
    return args, job_config


def save(results: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "eval_long.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(report(results), flush=True)
    print(f"wrote {out_dir}/eval_long.json", flush=True)


def main(argv: list[str]) -> None:
    args, job_config = parse_args(argv)
    job = validate(job_config)
    if args.backend == "transformers":
        save(evaluate_transformers(job_config, job, args), args.out_dir)
        return
    with distributed(job_config) as device:
        results = evaluate(job_config, job, args, device)
        if results is not None:
            save(results, args.out_dir)


if __name__ == "__main__":
    run_command(main)
