"""Tokenize a corpus once into memory-mapped shards that training reads row by row (recipes/tokenized.py).

    python scripts/tokenize_corpus.py --input CORPUS --output TOKENS_DIR [--model.hf_assets_path HF_DIR] [--workers N]
    python train.py --job.config_file CONFIG --training.dataset_path TOKENS_DIR

CORPUS is what training.dataset_path takes (a text/jsonl/parquet file or folder); each document
is encoded as the pretrain recipe encodes it (its tokens, then EOS), in order, by N processes.
Any further --section.key arguments are job-config keys (as for train.py): the tokenizer is
model.hf_assets_path's, the text column recipe.text_field's, the format training.dataset's.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import argparse  # noqa: E402
import itertools  # noqa: E402
import multiprocessing  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from components.build import run_command  # noqa: E402
from components.config import parse_config  # noqa: E402
from recipes.data import HFTokenizer, load_documents  # noqa: E402
from recipes.pretrain import document_tokens  # noqa: E402
from recipes.tokenized import ShardWriter, token_dtype  # noqa: E402

BATCH_DOCUMENTS = 256  # documents per task: large enough to amortize pickling, small enough to balance

_tokenizer: HFTokenizer | None = None  # one per worker process


def _load_tokenizer(assets_path: str) -> None:
    global _tokenizer
    _tokenizer = HFTokenizer(assets_path)


def encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(the documents' tokens back to back, their lengths), in the shard dtype."""
    documents = [document_tokens(_tokenizer, text) for text in texts]
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    tokens = np.fromiter((t for d in documents for t in d), dtype=token_dtype(_tokenizer.vocab_size), count=int(lengths.sum()))
    return tokens, lengths


def text_batches(documents, field: str):
    for start in range(0, len(documents), BATCH_DOCUMENTS):
        batch = documents[start : start + BATCH_DOCUMENTS]  # a datasets.Dataset gives columns, a list records
        yield batch[field] if isinstance(batch, dict) else [record[field] for record in batch]


def progress(total: int):
    """tqdm where installed, else a line every 5 s."""
    try:
        from tqdm import tqdm
        return tqdm(total=total, unit="doc", smoothing=0.1)
    except ImportError:
        return _Progress(total)


class _Progress:
    def __init__(self, total: int):
        self.total, self.done, self.start, self.last = total, 0, time.time(), 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.time()
        if now - self.last > 5 or self.done == self.total:
            self.last = now
            print(f"{self.done}/{self.total} documents, {self.done / max(now - self.start, 1e-9):.0f}/s", file=sys.stderr)

    def close(self) -> None:
        pass


def tokenize(input_path: str, output: str, job_config, workers: int, shard_tokens: int) -> dict:
    """Writes TOKENS_DIR; returns its metadata."""
    assets = job_config.model.hf_assets_path
    writer = ShardWriter(output, HFTokenizer(assets), shard_tokens)  # refuses a bad tokenizer or output first
    field = job_config.recipe.text_field
    documents = load_documents(input_path, job_config.training.dataset, field)
    batches = text_batches(documents, field)
    # fork: workers start without importing torch again (before tqdm, whose monitor is a thread)
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with context.Pool(workers, initializer=_load_tokenizer, initargs=(assets,)) as pool:
        bar = progress(len(documents))
        # A window at a time: Pool.imap would read (and pickle) the whole corpus ahead of the workers.
        while window := list(itertools.islice(batches, 4 * workers)):
            for tokens, lengths in pool.imap(encode_batch, window):  # in order
                writer.add(tokens, lengths)
                bar.update(len(lengths))
        bar.close()
    return writer.finish(input_path)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="corpus: a text/jsonl/parquet file or folder")
    parser.add_argument("--output", required=True, help="TOKENS_DIR to create (must not exist or be empty)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizing processes (default: all cores)")
    parser.add_argument("--shard-tokens", type=int, default=2**30, help="tokens per shard file (default 2^30)")
    args, config_args = parser.parse_known_args(argv)
    metadata = tokenize(args.input, args.output, parse_config(config_args), args.workers, args.shard_tokens)
    print(f"{args.output}: {metadata['num_documents']} documents, {metadata['num_tokens']} tokens "
          f"({metadata['dtype']}) in {len(metadata['shards'])} shard(s)")


if __name__ == "__main__":
    run_command(main, sys.argv[1:])
