"""Retrieval training data: natural text mixed with eval_long.py's passkey and multi-key tasks.

    python scripts/make_retrieval_data.py --out-dir data/retrieval_2k --lengths 256 2048 --train-tokens 80000000
    python scripts/make_retrieval_data.py --out-dir OUT --corpus BOOKS.jsonl --tokenizer HF_DIR --lengths 1024 8192

OUT gets
  train.jsonl, val.jsonl  {"text": ...} documents (training.dataset_path, validation.dataset_path), each
                          of a length drawn log-uniformly from --lengths tokens of --tokenizer (EOS
                          included: every length gets the same share of tokens; short documents, where
                          attention is least diluted, teach retrieval first) and, in the --mix
                          proportions, one of
                            natural   a window of natural text
                            passkey   eval_long.py's passkey task: one key hidden in repeated filler
                            multikey  eval_long.py's multi-key task: --keys needles "The magic number of
                                      the NAME is VALUE." at random depths of natural text, one asked for
                          Documents come in groups of exactly --pack-to tokens, so packed rows of that
                          many tokens (or a multiple) never cut one.
  heldout.jsonl           --heldout-docs documents of --heldout-length tokens of natural text made only of
                          corpus documents no other file uses: eval_long.py --corpus (loss by position,
                          multi-key haystacks)
  manifest.json           the arguments; documents and tokens per file and task

Natural text is the corpus's documents, shuffled and joined by spaces; --heldout-fraction of them are
held out. Documents are built in tokens and written as their decoded text; every cut falls on a token
boundary and every insertion before a word, so the text tokenizes back to exactly the document
(tests/test_learning.py checks it).

The tasks are longctx/data/retrieval.py's, the ones eval_long.py scores.
"""

import argparse
import contextlib
import gc
import itertools
import json
import math
import multiprocessing
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from longctx.base import ConfigError, DataError
from longctx.data.documents import load_documents
from longctx.data.retrieval import NAMES, NaturalText, Words, multikey_tokens, passkey_tokens
from longctx.data.tokenizer import HFTokenizer
from longctx.launch import run_command

TASKS = ("natural", "passkey", "multikey")

# ---------------------------------------------------------------- natural text


class Texts:
    """Some of a corpus's documents' texts, read when iterated (a corpus may be larger than memory)."""

    def __init__(self, records, field: str, indices: list[int]):
        self.records, self.field, self.indices = records, field, indices

    def __iter__(self):
        return (self.records[i][self.field] for i in self.indices)

    def shuffled(self, rng: random.Random) -> "Texts":
        return Texts(self.records, self.field, rng.sample(self.indices, len(self.indices)))


def natural_stream(words: Words, texts, limit: int) -> np.ndarray:
    """The texts (an iterable, in order) joined by single spaces, as tokens: all of them, or the
    first that hold `limit` tokens."""
    tokens, total, texts = [], 0, iter(texts)
    while total < limit and (batch := [" " + " ".join(t.split()) for t in itertools.islice(texts, 256)]):
        for encoding in words.tokenizer.tokenizer.encode_batch(batch, add_special_tokens=False):
            tokens.append(np.array(encoding.ids, dtype=np.int32))
            total += len(encoding.ids)
    return np.concatenate(tokens)


# ---------------------------------------------------------------- documents


class Documents:
    """Documents of the three tasks (the EOS that training appends counted in each length)."""

    def __init__(self, words: Words, natural: NaturalText, args):
        self.words, self.natural, self.args = words, natural, args

    def build(self, rng: random.Random, task: str, length: int) -> list[int]:
        content = length - 1  # the EOS
        if task == "natural":
            return self.natural.window(rng, content).tolist()
        if task == "passkey":
            return passkey_tokens(self.words, content, rng.random(), rng.randrange(10000, 100000))[0]
        pairs = list(zip(rng.sample(NAMES, self.args.keys), rng.sample(range(10000, 100000), self.args.keys)))
        depths = [rng.random() for _ in pairs]
        return multikey_tokens(self.words, self.natural.window(rng, content), content, pairs, depths,
                               rng.randrange(len(pairs)))[0]

    def group_lengths(self, rng: random.Random) -> list[int]:
        """Lengths drawn log-uniformly from --lengths, each cut to the room left, adding up to exactly --pack-to."""
        low, high = self.args.lengths
        lengths, room = [], self.args.pack_to
        while room:
            length = min(round(math.exp(rng.uniform(math.log(low), math.log(high)))), room)
            if room - length < low:  # too little left for a document: this one takes it
                length = room if room <= high else room - low
            lengths.append(length)
            room -= length
        return lengths

    def chunk(self, seed: str, n_tokens: int, mix: list[float]) -> tuple[str, dict]:
        """Whole groups of at least n_tokens tokens of the tasks in `mix` proportions, as JSON lines;
        their documents and tokens per task."""
        rng = random.Random(seed)
        lines, counts = [], {task: {"documents": 0, "tokens": 0} for task in TASKS}
        for _ in range(-(-n_tokens // self.args.pack_to)):
            for length in self.group_lengths(rng):
                task = rng.choices(TASKS, weights=mix)[0]
                lines.append(json.dumps({"text": self.words.tokenizer.tokenizer.decode(self.build(rng, task, length))}) + "\n")
                counts[task]["documents"] += 1
                counts[task]["tokens"] += length
        return "".join(lines), counts


CHUNK_TOKENS = 2**20  # per task of a worker: each chunk has its own seed, so the file is the same for any --workers
_documents: Documents | None = None  # the worker's


def _set_documents(documents: Documents) -> None:
    global _documents
    _documents = documents


def _chunk(chunk: tuple[str, int, list[float]]) -> tuple[str, dict]:
    return _documents.chunk(*chunk)


def write_documents(path: str, documents: Documents, parts: list[tuple[str, int, list[float]]], workers: int) -> dict:
    """Each (seed, n_tokens, mix) part in turn, in chunks built by `workers` processes and written
    in order; the documents and tokens per task."""
    counts = {task: {"documents": 0, "tokens": 0} for task in TASKS}
    chunks = [(f"{seed}-{i}", min(CHUNK_TOKENS, n_tokens - start), mix)
              for seed, n_tokens, mix in parts if n_tokens for i, start in enumerate(range(0, n_tokens, CHUNK_TOKENS))]
    with open(path, "w") as f, _chunk_builder(documents, workers) as build:
        for text, chunk_counts in build(_chunk, chunks):
            f.write(text)
            for task, c in chunk_counts.items():
                counts[task] = {key: counts[task][key] + value for key, value in c.items()}
    return counts


@contextlib.contextmanager
def _chunk_builder(documents: Documents, workers: int):
    """An ordered map over chunks: in this process for one worker, else forked workers, which
    start with the tokenized corpus without importing torch again. The objects that exist at the
    fork are frozen out of the collector first: a worker collecting the parent's objects (another
    thread's torch or process-group state, when called from a program with threads) may crash. A
    worker that dies fails the map (BrokenProcessPool) rather than hanging it."""
    if workers == 1:
        _set_documents(documents)
        yield map
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    gc.freeze()
    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_set_documents, initargs=(documents,)) as pool:
            yield pool.map
    finally:
        gc.unfreeze()


def heldout_documents(words: Words, texts: Texts, rng: random.Random, n_docs: int, length: int) -> list[str]:
    """n_docs documents of `length` tokens (EOS included), each the held-out texts in a new order:
    no text repeats within a document."""
    documents = []
    for _ in range(n_docs):
        stream = natural_stream(words, texts.shuffled(rng), length - 1)
        if len(stream) < length - 1:
            raise DataError(f"the held-out corpus documents hold {len(stream)} tokens, fewer than --heldout-length {length}; "
                            "raise --heldout-fraction or give a larger --corpus")
        documents.append(words.tokenizer.tokenizer.decode(stream[: length - 1].tolist()))
    return documents


def write_heldout(path: str, texts: list[str], length: int) -> dict:
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in texts)
    return {"natural": {"documents": len(texts), "tokens": len(texts) * length}}


# ---------------------------------------------------------------- the command


def check_args(args) -> None:
    """Every flag, before any work: one line naming it and the fix."""
    if os.path.isfile(args.out_dir) or (os.path.isdir(args.out_dir) and os.listdir(args.out_dir)):
        raise ConfigError(f"--out-dir {args.out_dir!r} exists and is not an empty folder; remove it or choose another")
    low, high = args.lengths
    if not 2 <= low <= high:
        raise ConfigError(f"--lengths {low} {high}: give MIN MAX tokens with 2 <= MIN <= MAX")
    args.pack_to = args.pack_to or high
    if args.pack_to < high:
        raise ConfigError(f"--pack-to {args.pack_to} is shorter than the longest document (--lengths MAX {high}); "
                          "give at least MAX (the rows of training.seq_len)")
    if len(args.mix) != len(TASKS) or min(args.mix) < 0 or sum(args.mix) <= 0:
        raise ConfigError(f"--mix {args.mix}: give {len(TASKS)} weights >= 0 ({', '.join(TASKS)}), not all 0")
    if not 1 <= args.keys <= len(NAMES):
        raise ConfigError(f"--keys {args.keys} must be between 1 and {len(NAMES)} (the names a multi-key task draws from)")
    if args.train_tokens < 1 or args.val_tokens < 1 or args.workers < 1:
        raise ConfigError("--train-tokens, --val-tokens and --workers must be >= 1")
    if not 0 <= args.passkey_first <= args.train_tokens:
        raise ConfigError(f"--passkey-first {args.passkey_first} must lie in [0, --train-tokens {args.train_tokens}]")
    if not 0 < args.heldout_fraction < 1:
        raise ConfigError(f"--heldout-fraction {args.heldout_fraction} must lie in (0, 1)")
    if args.heldout_docs < 0 or args.heldout_length < 2:
        raise ConfigError("--heldout-docs must be >= 0 and --heldout-length >= 2")
    if not os.path.exists(args.corpus):
        raise ConfigError(f"--corpus {args.corpus!r} does not exist; give a text/jsonl/parquet file or folder of documents")


def check_prompts_fit(documents: Documents, args) -> None:
    """The shortest document must hold each task's prompt (with a shortest filler)."""
    rng = random.Random(0)
    for task in TASKS[1:]:
        if args.mix[TASKS.index(task)] > 0:
            try:
                documents.build(rng, task, args.lengths[0])
            except (ConfigError, DataError) as e:
                raise ConfigError(f"--lengths MIN {args.lengths[0]} is too short for the {task} task: {e}") from None


def split_corpus(path: str, field: str, fraction: float, rng: random.Random) -> tuple[Texts, Texts]:
    """(training texts, held-out texts): the corpus's documents shuffled, the first `fraction` held out."""
    records = load_documents(path, "auto", field)
    order = rng.sample(range(len(records)), len(records))
    held = round(fraction * len(order))
    if not 0 < held < len(order):
        raise DataError(f"--corpus {path} has {len(order)} documents: too few to hold out --heldout-fraction {fraction} of them")
    return Texts(records, field, order[held:]), Texts(records, field, order[:held])


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", required=True, help="folder to create (must not exist, or be empty)")
    parser.add_argument("--corpus", default="assets/debug/corpus.jsonl", help="natural text: a text/jsonl/parquet file or folder")
    parser.add_argument("--text-field", default="text", help="the JSON/parquet column of the corpus's text")
    parser.add_argument("--tokenizer", default="assets/debug", help="folder with tokenizer.json (the model's hf_assets_path)")
    parser.add_argument("--lengths", type=int, nargs=2, default=[128, 2048], metavar=("MIN", "MAX"),
                        help="document lengths in tokens, EOS included, drawn log-uniformly")
    parser.add_argument("--pack-to", type=int, default=0, help="tokens per group of documents (default: MAX)")
    parser.add_argument("--mix", type=float, nargs=3, default=[0.2, 0.4, 0.4], metavar=TASKS,
                        help="weights of the three document kinds")
    parser.add_argument("--keys", type=int, default=4, help="key/value pairs per multi-key document")
    parser.add_argument("--train-tokens", type=int, default=2**25, help="tokens of train.jsonl (whole groups: up to --pack-to more)")
    parser.add_argument("--passkey-first", type=int, default=0,
                        help="train.jsonl opens with this many tokens of passkey documents alone (of --train-tokens): a "
                             "small model forms the copying circuit on the easiest task first, then keeps it in the mix")
    parser.add_argument("--val-tokens", type=int, default=2**20, help="tokens of val.jsonl")
    parser.add_argument("--heldout-fraction", type=float, default=0.2, help="corpus documents kept for heldout.jsonl")
    parser.add_argument("--heldout-docs", type=int, default=8)
    parser.add_argument("--heldout-length", type=int, default=16384, help="tokens per held-out document, EOS included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes building documents (default: all cores)")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def main(argv: list[str]) -> None:
    start = time.perf_counter()
    args = parse_args(argv)
    words = Words(HFTokenizer(args.tokenizer))
    rng = random.Random(args.seed)
    train_texts, heldout_texts = split_corpus(args.corpus, args.text_field, args.heldout_fraction, rng)
    # Enough natural text that windows rarely meet twice; the whole training split when it is smaller.
    documents = Documents(words, NaturalText(words, natural_stream(words, train_texts, 2**24)), args)
    check_prompts_fit(documents, args)
    heldout = heldout_documents(words, heldout_texts, random.Random(f"{args.seed}-heldout"), args.heldout_docs, args.heldout_length)
    os.makedirs(args.out_dir, exist_ok=True)
    out = lambda name: os.path.join(args.out_dir, name)  # noqa: E731
    passkey_only = [float(task == "passkey") for task in TASKS]
    train_parts = [(f"{args.seed}-train-passkey-first", args.passkey_first, passkey_only),
                   (f"{args.seed}-train", args.train_tokens - args.passkey_first, args.mix)]
    files = {"train.jsonl": write_documents(out("train.jsonl"), documents, train_parts, args.workers),
             "val.jsonl": write_documents(out("val.jsonl"), documents, [(f"{args.seed}-val", args.val_tokens, args.mix)], args.workers),
             "heldout.jsonl": write_heldout(out("heldout.jsonl"), heldout, args.heldout_length)}
    with open(out("manifest.json"), "w") as f:
        json.dump({"args": vars(args), "files": files}, f, indent=1)
    for name, counts in files.items():
        line = ", ".join(f"{task} {c['documents']} documents {c['tokens'] / 1e6:.2f}M tokens" for task, c in counts.items())
        print(f"{out(name)}: {line}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_command(main)
