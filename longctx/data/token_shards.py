"""A corpus tokenized once (scripts/tokenize_corpus.py) into memory-mapped shards, packed into rows by arithmetic.

A TOKENS_DIR holds
  shard-00000.bin      documents' tokens back to back, each closed by EOS (pretrain's encoding);
                       uint16 when the vocabulary fits, else uint32: nanoGPT's train.bin
  shard-00000.idx.npy  int64 end offset of each document in its shard: the document index of
                       Megatron's indexed datasets
  metadata.json        written last, so a folder without it is an unfinished run: the
                       tokenizer's identity (training refuses another tokenizer), dtype, counts

The stream is the corpus repeated epoch after epoch. A row of L tokens starting at token t
covers [t, t+L) of it, so row r of a constant-L run is [r*L, (r+1)*L): a rank reads its own
rows and nothing else, and its cost does not grow with dp. The rows equal PackedStream's over
the same documents (tests/test_data.py): labels are the next token within the document (a
document's last token, EOS, predicts nothing), positions restart where a document or the row
starts, and document ids count the row's segments.
"""

import hashlib
import json
import os

import numpy as np

from longctx.base import IGNORE_INDEX, DataError
from longctx.data.packing import RowPlan, packed_row
from longctx.data.tokenizer import HFTokenizer

METADATA = "metadata.json"
FORMAT = "tokens-v1"
DTYPES = ("uint16", "uint32")  # token_dtype's choices


def is_token_folder(path: str | None) -> bool:
    """Whether `path` is a folder of scripts/tokenize_corpus.py. Shard files without metadata.json
    (written last) are a run that did not finish: refused, rather than read as documents."""
    if not path or not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, METADATA)):
        return True
    if any(name.startswith("shard-") and name.endswith(".bin") for name in os.listdir(path)):
        raise DataError(f"{path} holds shard files but no {METADATA}: an unfinished tokenize_corpus run; "
                        "run scripts/tokenize_corpus.py again into an empty folder")
    return False


def tokenizer_identity(tokenizer: HFTokenizer) -> dict:
    """What the token ids mean: a hash of the tokenizer as the `tokenizers` library serializes it
    (the same for two copies of one tokenizer, whatever their folder), its vocabulary and EOS."""
    serialized = tokenizer.tokenizer.to_str().encode()
    return {"sha256": hashlib.sha256(serialized).hexdigest(), "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class ShardWriter:
    """Appends documents to shards of about shard_tokens tokens; finish() writes metadata.json."""

    def __init__(self, folder: str, tokenizer: HFTokenizer, shard_tokens: int):
        if os.path.exists(folder) and os.listdir(folder):
            raise DataError(f"{folder} already exists and is not empty; remove it or choose another output folder")
        os.makedirs(folder, exist_ok=True)
        self.folder, self.shard_tokens = folder, shard_tokens
        self.identity, self.dtype = tokenizer_identity(tokenizer), token_dtype(tokenizer.vocab_size)
        self.shards: list[dict] = []
        self.file, self.ends = None, []

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """tokens: a batch of documents back to back (self.dtype); lengths: one per document.
        A shard closes after the document that fills it: shards hold whole documents."""
        while len(lengths):
            if self.file is None:
                self.file = open(os.path.join(self.folder, f"shard-{len(self.shards):05d}.bin"), "wb")
            start = self.ends[-1] if self.ends else 0
            ends = start + np.cumsum(lengths)
            count = min(int(np.searchsorted(ends, self.shard_tokens)) + 1, len(lengths))  # documents for this shard
            used = int(ends[count - 1]) - start
            self.file.write(tokens[:used].tobytes())
            self.ends.extend(ends[:count].tolist())
            if self.ends[-1] >= self.shard_tokens:
                self._close_shard()
            tokens, lengths = tokens[used:], lengths[count:]

    def _close_shard(self) -> None:
        name = f"shard-{len(self.shards):05d}"
        self.file.close()
        np.save(os.path.join(self.folder, f"{name}.idx.npy"), np.array(self.ends, dtype=np.int64))
        self.shards.append({"name": name, "num_tokens": self.ends[-1], "num_documents": len(self.ends)})
        self.file, self.ends = None, []

    def finish(self, source: str) -> dict:
        if self.ends:
            self._close_shard()
        if not self.shards:
            raise DataError(f"{source!r} has no documents")
        metadata = {
            "format": FORMAT, "source": source, "tokenizer": self.identity, "dtype": self.dtype.name,
            "num_documents": sum(s["num_documents"] for s in self.shards),
            "num_tokens": sum(s["num_tokens"] for s in self.shards), "shards": self.shards,
        }
        with open(os.path.join(self.folder, METADATA), "w") as f:
            json.dump(metadata, f, indent=1)
        return metadata


def read_metadata(folder: str) -> dict:
    """metadata.json, its fields checked: one line naming it when it is cut, not JSON, or not ours."""
    path = os.path.join(folder, METADATA)
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise DataError(f"{path} is not valid JSON ({' '.join(str(e).split())[:120]}); the folder is damaged: "
                        "tokenize the corpus again") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise DataError(f"{path}: format {found!r}, not {FORMAT!r}; tokenize the corpus again with scripts/tokenize_corpus.py")
    shards = metadata.get("shards")
    fields_ok = (metadata.get("dtype") in DTYPES and "tokenizer" in metadata and isinstance(shards, list) and shards
                 and all(isinstance(s, dict) and isinstance(s.get("name"), str) and _is_count(s.get("num_tokens"))
                         and _is_count(s.get("num_documents")) for s in shards)
                 and metadata.get("num_tokens") == sum(s["num_tokens"] for s in shards)
                 and metadata.get("num_documents") == sum(s["num_documents"] for s in shards))
    if not fields_ok:
        raise DataError(f"{path} is damaged: it needs dtype ({' or '.join(DTYPES)}), tokenizer, and shards of name, "
                        "num_tokens and num_documents that add up to its totals; tokenize the corpus again")
    return metadata


def open_shard(folder: str, shard: dict, dtype: np.dtype, vocab_size: int) -> tuple[np.memmap, np.ndarray]:
    """A shard's tokens (memory-mapped) and document ends, checked against metadata.json."""
    bin_path, idx_path = (os.path.join(folder, shard["name"] + suffix) for suffix in (".bin", ".idx.npy"))
    expected = shard["num_tokens"] * dtype.itemsize
    size = os.path.getsize(bin_path) if os.path.isfile(bin_path) else None
    if size != expected:
        found = "is missing" if size is None else f"has {size} bytes"
        raise DataError(f"{bin_path} {found}; {METADATA} records {shard['num_tokens']} {dtype.name} tokens ({expected} bytes): "
                        "the shard is damaged, tokenize the corpus again")
    try:
        ends = np.load(idx_path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{idx_path} is unreadable ({' '.join(str(e).split())[:120]}); tokenize the corpus again") from None
    consistent = (ends.ndim == 1 and ends.dtype.kind in "iu" and len(ends) == shard["num_documents"]
                  and int(ends[0]) > 0 and int(ends[-1]) == shard["num_tokens"] and bool(np.all(np.diff(ends) > 0)))
    if not consistent:
        raise DataError(f"{idx_path} does not index its shard: {METADATA} records {shard['num_documents']} documents "
                        f"ending at ascending offsets up to {shard['num_tokens']}; tokenize the corpus again")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    largest = int(tokens.max())
    if largest >= vocab_size:
        raise DataError(f"{bin_path} holds token id {largest}, but the tokenizer has {vocab_size} tokens: "
                        "the shard is damaged, tokenize the corpus again")
    return tokens, ends


def _is_count(value) -> bool:
    return type(value) is int and value > 0


class TokenCorpus:
    """The shards of a TOKENS_DIR, memory-mapped: reading pages in only the spans asked for.
    Opening checks the folder against its metadata.json, one line naming the damaged file: a shard
    cut short (it would train until a row reaches the missing tokens), an index that does not
    match it, a token id the tokenizer cannot have written (bytes of 0xFF would reach the
    embedding), or another tokenizer than the training one. The id check reads each shard once
    (a vectorized max over the memory map: as fast as the disk, 0.25 s per GiB from the page cache)."""

    def __init__(self, folder: str, tokenizer: HFTokenizer):
        metadata = read_metadata(folder)
        if metadata["tokenizer"] != tokenizer_identity(tokenizer):
            theirs = metadata["tokenizer"].get("sha256") if isinstance(metadata["tokenizer"], dict) else None
            raise DataError(f"{folder} was tokenized with another tokenizer than model.hf_assets_path's "
                            f"({str(theirs)[:12]} vs {tokenizer_identity(tokenizer)['sha256'][:12]}); "
                            "tokenize again with this model's --model.hf_assets_path")
        dtype = np.dtype(metadata["dtype"])
        shards = [open_shard(folder, shard, dtype, tokenizer.vocab_size) for shard in metadata["shards"]]
        self.tokens, self.ends = [tokens for tokens, _ in shards], [ends for _, ends in shards]
        self.shard_starts = np.cumsum([0] + [s["num_tokens"] for s in metadata["shards"]])
        self.num_tokens, self.num_documents = metadata["num_tokens"], metadata["num_documents"]

    def walk(self, start: int, length: int):
        """Stream tokens [start, start+length) of the endless stream, shard by shard: (shard, lo, hi,
        ends) for tokens lo:hi of each shard crossed, ends the offsets in (0, length] at which a
        document ends inside them. The index alone: no token is read."""
        done = 0
        while done < length:
            at = (start + done) % self.num_tokens
            shard = int(np.searchsorted(self.shard_starts, at, side="right")) - 1
            lo = at - int(self.shard_starts[shard])
            hi = min(int(self.shard_starts[shard + 1] - self.shard_starts[shard]), lo + length - done)
            shard_ends = self.ends[shard]
            inside = shard_ends[np.searchsorted(shard_ends, lo, side="right") : np.searchsorted(shard_ends, hi, side="right")]
            yield shard, lo, hi, inside - lo + done
            done += hi - lo

    def span(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, start+length) of the endless stream (int64), and the offsets in (0, length]
        at which a document ends inside it (ascending)."""
        pieces = list(self.walk(start, length))
        tokens = np.concatenate([self.tokens[shard][lo:hi] for shard, lo, hi, _ in pieces])
        return tokens.astype(np.int64), np.concatenate([ends for *_, ends in pieces])


class TokenStream:
    """Packed rows of a TokenCorpus; the same interface and rows as PackedStream (pretrain's),
    with the state one number: the stream token where the next row starts (a token offset rather
    than a row index, so it survives a change of row length)."""

    whole_documents = False  # rows cut documents at fixed token offsets: they move, their pieces do not

    def __init__(self, corpus: TokenCorpus, pad_id: int):
        self.corpus, self.pad_id = corpus, pad_id
        self.next_token = 0

    def row(self, start: int, row):
        """The row of row.tokens whose first token is stream token `start`, padded to row.padded."""
        length = row.tokens
        tokens, ends = self.corpus.span(start, length + 1)  # one token more: the last label
        labels = tokens[1:].copy()
        labels[ends[ends <= length] - 1] = IGNORE_INDEX  # a document's last token predicts nothing
        lengths = np.diff(ends[ends < length], prepend=0, append=length)  # the row's pieces of documents
        return packed_row(tokens[:-1], labels, lengths, row.padded, self.pad_id)

    def next_rows(self, count: int, wanted: list[int], row):
        """Advance `count` rows; return those at the offsets in `wanted`, reading nothing else."""
        rows = [self.row(self.next_token + offset * row.tokens, row) for offset in wanted]
        self.next_token += count * row.tokens
        return rows

    def plan_rows(self, count: int, row) -> list[RowPlan]:
        """Advance `count` rows: each row's first stream token and its pieces of documents, read
        off the document index alone (no token is read: a rank reads the tokens of its rows only)."""
        starts = [self.next_token + offset * row.tokens for offset in range(count)]
        self.next_token += count * row.tokens
        return [RowPlan(self.piece_lengths(start, row.tokens), start) for start in starts]

    def build_row(self, plan: RowPlan, row):
        return self.row(plan.source, row)

    def piece_lengths(self, start: int, length: int) -> tuple[int, ...]:
        """Lengths of the pieces of documents in stream tokens [start, start+length): the row's
        segments, as `row` cuts them, from the document index alone."""
        ends = np.concatenate([ends for *_, ends in self.corpus.walk(start, length)])
        inner = ends[ends < length]  # a document ending with the row closes its last piece anyway
        return tuple(np.diff(inner, prepend=0, append=length).tolist())

    def state_dict(self) -> dict:
        return {"next_token": self.next_token}

    def load_state_dict(self, state: dict) -> None:
        self.next_token = state["next_token"]
