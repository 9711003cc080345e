"""Tokenize a corpus once into memory-mapped shards that training reads row by row (longctx/data/token_shards.py).

    python scripts/tokenize_corpus.py --input CORPUS --output TOKENS_DIR [--model.hf_assets_path HF_DIR] [--workers N]
    python train.py --job.config_file CONFIG --training.dataset_path TOKENS_DIR

CORPUS is what training.dataset_path takes (a text/jsonl/parquet file or folder); each document
is encoded as the pretrain recipe encodes it (its tokens, then EOS), in order, by N processes.
Any further --section.key arguments are job-config keys (as for train.py): the tokenizer is
model.hf_assets_path's, the text column recipe.text_field's, the format training.dataset's.
"""

import argparse
import os

from longctx.base import ConfigError
from longctx.config import parse_config
from longctx.data.tokenize_corpus import tokenize_corpus
from longctx.launch import check_output, run_command


def check_args(args) -> None:
    """Before any document is read: one line naming the flag."""
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers} must be >= 1 (tokenizing processes)")
    if args.shard_tokens < 1:
        raise ConfigError(f"--shard-tokens {args.shard_tokens} must be >= 1 (tokens per shard file; default 2^30)")
    check_output("--output", args.output, folder=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="corpus: a text/jsonl/parquet file or folder")
    parser.add_argument("--output", required=True, help="TOKENS_DIR to create (must not exist or be empty; its parent folder must exist)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizing processes (default: all cores)")
    parser.add_argument("--shard-tokens", type=int, default=2**30, help="tokens per shard file (default 2^30)")
    args, config_args = parser.parse_known_args(argv)
    check_args(args)
    job_config = parse_config(config_args)
    metadata = tokenize_corpus(args.input, args.output, job_config.model.hf_assets_path, job_config.training.dataset,
                               job_config.recipe.text_field, args.workers, args.shard_tokens)
    print(f"{args.output}: {metadata['num_documents']} documents, {metadata['num_tokens']} tokens "
          f"({metadata['dtype']}) in {len(metadata['shards'])} shard(s)")


if __name__ == "__main__":
    run_command(main)
