"""Tokenizing a corpus once, in parallel processes, into the shards of data/token_shards.py.

Each document is encoded as pretraining encodes it (data/tokenizer.document_tokens: its tokens,
then EOS), in order; scripts/tokenize_corpus.py is the command."""

import itertools
import multiprocessing
import sys
import time

import numpy as np

from longctx.data.documents import load_documents
from longctx.data.token_shards import ShardWriter, token_dtype
from longctx.data.tokenizer import HFTokenizer, document_tokens

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


def tokenize_corpus(input_path: str, output: str, assets: str, fmt: str, field: str, workers: int, shard_tokens: int) -> dict:
    """Writes TOKENS_DIR from the documents of input_path (format fmt, text in `field`) with the
    tokenizer of `assets`, in `workers` processes; returns its metadata."""
    writer = ShardWriter(output, HFTokenizer(assets), shard_tokens)  # refuses a bad tokenizer or output first
    documents = load_documents(input_path, fmt, field)
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
