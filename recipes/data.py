"""Documents from local files, an HF tokenizer.json, and packing into fixed-length rows.

A packed row carries everything a step needs, computed here once on the data side:
  input_ids    [T]  tokens of several documents back to back (EOS closes each document)
  labels       [T]  next token WITHIN the document, shifted on the full row before any sharding;
                    a document's last position and padding get IGNORE_INDEX
  position_ids [T]  restart at 0 at every document start (RoPE positions)
  document_ids [T]  which document a token belongs to (the attention mask; padding is its own)
  ...          [T]  per-token floats a recipe adds (the policy's advantages, old log-probs)
"""

import itertools
import json
import os
import queue
import threading
import time
from array import array

import numpy as np
import torch
from tokenizers import Tokenizer

from models.common.loss import IGNORE_INDEX

_FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Unreadable or missing data/tokenizer; the message is one line naming the path."""


def load_documents(path: str, fmt: str = "auto", text_field: str | None = "text"):
    """Documents from a local file or folder (no network), by index. JSON lines and text are
    read here, line by line (`LineRecords`); parquet through `datasets` (memory-mapped Arrow).
    Reading a document checks it and names its file:line (parquet: its row); with text_field,
    that its text_field is a string. text_field=None: the caller checks its own fields."""
    if not path or not os.path.exists(path):
        raise DataError(f"training.dataset_path={path!r} does not exist; point it at a local text/jsonl/parquet file or folder")
    files = sorted(os.path.join(path, f) for f in os.listdir(path)) if os.path.isdir(path) else [path]
    if fmt == "auto":
        kinds = {_FORMATS.get(os.path.splitext(f)[1]) for f in files}
        if len(kinds) != 1 or None in kinds:
            raise DataError(f"cannot tell the format of {path!r} from extensions {sorted({os.path.splitext(f)[1] for f in files})}; set training.dataset to text, json or parquet")
        fmt = kinds.pop()
    records = ParquetRecords(path, files, text_field) if fmt == "parquet" else LineRecords(path, files, fmt, text_field)
    records[0]  # the first document's format and fields are checked before any work starts
    return records


class Records:
    """Documents by index. Subclasses read one (`_read`) and say where it is (`where`)."""

    text_field: str | None

    def __getitem__(self, index: int | slice) -> dict | list[dict]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        record = self._read(index)
        if self.text_field is not None and not isinstance(record.get(self.text_field), str):
            found = "missing" if record.get(self.text_field) is None else f"{record[self.text_field]!r:.60}, not a string"
            raise DataError(f"{self.where(index)}: {self.text_field!r} is {found}; every record needs a string "
                            f"{self.text_field!r} (recipe.text_field names the field)")
        return record

    @property
    def column_names(self) -> list[str]:
        return list(self._read(0))


class LineRecords(Records):
    """JSON lines (one object per line) or text (one document per line) of local files, read on
    access through an index of where each non-blank line starts: 20 bytes per document instead
    of a copy of the corpus, so corpora of any size load in one pass (~1 s per GB) and every
    error names its file:line. Blank (whitespace-only) lines are not documents."""

    def __init__(self, path: str, files: list[str], fmt: str, text_field: str | None):
        self.files, self.fmt, self.text_field = files, fmt, text_field
        self.file_index, self.offsets, self.line_numbers = array("i"), array("q"), array("q")
        for index, file in enumerate(files):
            with open(file, "rb") as f:
                offset = 0
                for number, line in enumerate(f, 1):
                    if line.strip():
                        self.file_index.append(index)
                        self.offsets.append(offset)
                        self.line_numbers.append(number)
                    offset += len(line)
        if not self.offsets:
            raise DataError(f"training.dataset_path={path!r} has no documents (empty, or only blank lines); "
                            "point it at a corpus with text")

    def __len__(self) -> int:
        return len(self.offsets)

    def where(self, index: int) -> str:
        return f"{self.files[self.file_index[index]]}:{self.line_numbers[index]}"

    def _read(self, index: int) -> dict:
        with open(self.files[self.file_index[index]], "rb") as f:
            f.seek(self.offsets[index])
            line = f.readline()
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{self.where(index)}: not UTF-8 (byte {line[e.start:e.start + 1]!r} at column "
                            f"{e.start + 1}); re-encode the file as UTF-8") from None
        if self.fmt == "text":
            return {"text": text.rstrip("\r\n")}
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{self.where(index)}: not valid JSON ({e.msg.removesuffix(' at')}, column {e.colno}); "
                            "JSON lines hold one object per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{self.where(index)}: a {type(record).__name__}, not a JSON object; "
                            "JSON lines hold one object {...} per line")
        return record


class ParquetRecords(Records):
    """Parquet through `datasets` (memory-mapped Arrow, any size); errors name the row."""

    def __init__(self, path: str, files: list[str], text_field: str | None):
        try:
            import datasets
        except ImportError:  # e.g. a machine without pyarrow: JSON lines and text still load
            raise DataError("reading parquet needs the `datasets` package (pip install datasets)") from None
        datasets.disable_progress_bars()
        try:
            self.rows = datasets.load_dataset("parquet", data_files=files, split="train")
        except Exception as e:  # pyarrow raises many types for unreadable files
            raise DataError(f"could not read {path!r} as parquet: {' '.join(str(e).split())[:200]}") from None
        if len(self.rows) == 0:
            raise DataError(f"training.dataset_path={path!r} has no rows")
        self.path, self.text_field = path, text_field

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, index: int) -> str:
        return f"{self.path} row {index}"

    def _read(self, index: int) -> dict:
        return self.rows[index]


class HFTokenizer:
    """tokenizer.json through `tokenizers`; EOS from tokenizer_config.json."""

    def __init__(self, assets_path: str):
        path = os.path.join(assets_path, "tokenizer.json")
        if not os.path.isfile(path):
            raise DataError(f"no tokenizer.json in model.hf_assets_path={assets_path!r}; point it at an HF tokenizer folder")
        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for any parse error
            raise DataError(f"{path} is not a readable tokenizer.json ({' '.join(str(e).split())[:200]}); "
                            "replace it with the model's own") from None
        self.config = _read_json(os.path.join(assets_path, "tokenizer_config.json"))  # also read by recipes/chat.py
        eos = self.config.get("eos_token") or "<|endoftext|>"
        eos = eos["content"] if isinstance(eos, dict) else eos
        self.eos_id = self.tokenizer.token_to_id(eos)
        if self.eos_id is None:
            raise DataError(f"EOS token {eos!r} is not in {path}")
        self.vocab_size = self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise DataError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id


def _read_json(path: str) -> dict:
    """A JSON object file, {} when there is none."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(config, dict):
        raise DataError(f"{path} is not a JSON object")
    return config


def pack_row(segments: list[tuple], seq_len: int, pad_id: int, extra_fields: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Lay (tokens, labels, *extras) segments end to end into one row of seq_len, padding the rest.
    Each segment's labels are already shifted within the segment. `extras` are per-token float
    lists (e.g. a policy's advantages), one per name in extra_fields; padding gets 0."""
    columns = [list(itertools.chain.from_iterable(column)) for column in zip(*segments)] or [[]] * (2 + len(extra_fields))
    return packed_row(columns[0], columns[1], [len(s[0]) for s in segments], seq_len, pad_id,
                      dict(zip(extra_fields, columns[2:])))


def packed_row(tokens, labels, lengths, seq_len: int, pad_id: int, extras: dict | None = None) -> dict[str, torch.Tensor]:
    """The row of segments already laid end to end: tokens and labels (lists or int64 arrays) and
    each segment's length; positions restart and document ids count up at every segment."""
    pad = seq_len - len(tokens)

    def padded(values, fill, dtype) -> torch.Tensor:
        return torch.cat([torch.as_tensor(values, dtype=dtype), torch.full((pad,), fill, dtype=dtype)])

    # Padding is one more segment: its positions restart at 0 and it attends only to itself, so
    # no row is fully masked. numpy, not torch.repeat_interleave, whose intra-op threads would
    # contend with the step's.
    spans = np.array([*lengths, pad])
    starts = np.cumsum(spans) - spans
    return {
        "input_ids": padded(tokens, pad_id, torch.long),
        "labels": padded(labels, IGNORE_INDEX, torch.long),
        "position_ids": torch.from_numpy(np.arange(seq_len) - np.repeat(starts, spans)),
        "document_ids": torch.from_numpy(np.repeat(np.arange(len(spans)), spans)),
        **{name: padded(values, 0.0, torch.float32) for name, values in (extras or {}).items()},
    }


def next_token_labels(tokens: list[int]) -> list[int]:
    """Shift within the document: the last token predicts nothing across the boundary."""
    return tokens[1:] + [IGNORE_INDEX]


def pack_greedy(sizes: list[float], capacity: float) -> list[list[int]]:
    """Indices of `sizes`, in order, grouped greedily: a group closes when the next item would
    overflow it; an item larger than capacity gets a group of its own."""
    groups, used = [[]], 0
    for index, size in enumerate(sizes):
        if groups[-1] and used + size > capacity:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += size
    return groups


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


class PackedStream:
    """Endless packed rows over `documents`, epoch after epoch; its state resumes it exactly.

    `encode(record)` returns (tokens, labels, *extras): one per-token float list per name in
    extra_fields. A document longer than the room left in a row continues at the start of the
    next row (its labels still point at its own next tokens; its positions restart), unless
    split_documents=False: then it starts the next row whole, and one longer than seq_len is an
    error (a policy's log-probabilities are only right if every token sees its whole prompt).

    Rows depend on every document before them, so every rank encodes the whole global stream:
    fine for small data; a large corpus is tokenized once (recipes/tokenized.py)."""

    def __init__(self, documents, encode, seq_len: int, padded_len: int, pad_id: int,
                 extra_fields: tuple[str, ...] = (), split_documents: bool = True):
        if len(documents) == 0:
            raise DataError("the dataset has no documents")
        self.documents, self.encode = documents, encode
        self.seq_len, self.padded_len, self.pad_id = seq_len, padded_len, pad_id
        self.extra_fields, self.split_documents = extra_fields, split_documents
        self.doc_index = 0  # documents consumed so far, over all epochs
        self.carry: tuple[list, ...] | None = None  # (tokens, labels, *extras) left for the next row

    def set_row_len(self, seq_len: int, padded_len: int) -> None:
        """Rows from the next one on hold seq_len tokens, padded to padded_len."""
        self.seq_len, self.padded_len = seq_len, padded_len

    def next_row(self) -> dict[str, torch.Tensor]:
        return pack_row(self._next_segments(), self.padded_len, self.pad_id, self.extra_fields)

    def next_rows(self, count: int, wanted: list[int]) -> list[dict[str, torch.Tensor]]:
        """Advance `count` rows; return those at the offsets in `wanted` (ascending). The others
        are encoded (their boundaries move every later row) but never turned into tensors."""
        wanted = set(wanted)
        rows = []
        for offset in range(count):
            segments = self._next_segments()
            if offset in wanted:
                rows.append(pack_row(segments, self.padded_len, self.pad_id, self.extra_fields))
        return rows

    def _next_segments(self) -> list[tuple]:
        segments, used = [], 0
        while used < self.seq_len:
            if self.carry is not None:
                segment, self.carry = self.carry, None
            else:
                segment = self.encode(self.documents[self.doc_index % len(self.documents)])
                self.doc_index += 1
            room, length = self.seq_len - used, len(segment[0])
            if length > room and not self.split_documents:
                if length > self.seq_len:
                    raise DataError(f"document {(self.doc_index - 1) % len(self.documents)} has {length} tokens > "
                                    f"training.seq_len={self.seq_len}; raise seq_len (this recipe never splits a document)")
                self.carry = segment
                break
            if length > room:
                segment, self.carry = tuple(s[:room] for s in segment), tuple(s[room:] for s in segment)
            if length:
                segments.append(segment)
                used += len(segment[0])
        return segments

    def state_dict(self) -> dict:
        return {"doc_index": self.doc_index, "carry": self.carry}

    def load_state_dict(self, state: dict) -> None:
        self.doc_index, self.carry = state["doc_index"], state["carry"]


class StepLoader:
    """Per step, this rank's micro-batches of the global batch, built ahead in a background thread.

    The global batch is one stream's next global_batch_size rows whatever the layout, so the loss
    and gradients are identical under any dp/cp/tp; cp and tp ranks get the same rows and shard
    them later. Micro-batch m of dp rank r holds rows [(m*dp + r)*b, (m*dp + r + 1)*b) of the
    step's global batch, and a rank builds tensors for those rows only.

    A thread keeps up to `prefetch` steps ready while the accelerator runs the current one (as
    torch's DataLoader workers do). A thread, not processes: the tokenized path's work is a few
    memory-map slices and array copies, which release the GIL; the on-the-fly path's Python
    packing does share the GIL with the loop (small data only). The state is the position after
    the last step handed out, not the thread's: a checkpoint never skips the prefetched steps."""

    def __init__(self, stream, local_batch_size: int, global_batch_size: int, dp: int, dp_rank: int, prefetch: int = 2):
        if global_batch_size % (local_batch_size * dp):
            raise DataError(
                f"global_batch_size={global_batch_size} is not a multiple of local_batch_size*dp = "
                f"{local_batch_size}*{dp}; gradient accumulation needs whole micro-batches"
            )
        self.stream, self.local_batch_size, self.global_batch_size = stream, local_batch_size, global_batch_size
        self.dp, self.dp_rank, self.prefetch = dp, dp_rank, prefetch
        self.grad_accum_steps = global_batch_size // (local_batch_size * dp)
        self.state = stream.state_dict()
        self.wait_seconds = 0.0  # time next_step spent blocked on the thread, over the run
        self._thread = None

    def owned_rows(self) -> list[int]:
        """This rank's offsets in a step's global batch, micro-batch after micro-batch."""
        b = self.local_batch_size
        return [(m * self.dp + self.dp_rank) * b + i for m in range(self.grad_accum_steps) for i in range(b)]

    def build_step(self) -> tuple[list[dict[str, torch.Tensor]], dict]:
        """The next step's micro-batches and the stream's state after it (the thread's work)."""
        rows, b = self.stream.next_rows(self.global_batch_size, self.owned_rows()), self.local_batch_size
        return [collate(rows[m * b : (m + 1) * b]) for m in range(self.grad_accum_steps)], self.stream.state_dict()

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        if self._thread is None:
            self._queue, self._stop = queue.Queue(maxsize=self.prefetch), threading.Event()
            self._thread = threading.Thread(target=_build_steps, args=(self.build_step, self._queue, self._stop),
                                            name="StepLoader", daemon=True)
            self._thread.start()
        start = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - start
        if isinstance(item, Exception):
            self.close()
            raise item  # e.g. a DataError met while packing: the user's one line, from this thread
        microbatches, self.state = item
        return microbatches

    def set_row_len(self, seq_len: int, padded_len: int) -> None:
        """Steps not yet handed out hold rows of seq_len tokens padded to padded_len (a staged
        context extension); steps built ahead at the old length are built again."""
        if (seq_len, padded_len) != (self.stream.seq_len, self.stream.padded_len):
            self.close()
            self.stream.set_row_len(seq_len, padded_len)

    def close(self) -> None:
        """Stop the thread and rewind the stream to the last step handed out; the next
        next_step starts a new thread from there."""
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():  # a put blocked on the full queue returns once it is drained
                while not self._queue.empty():
                    self._queue.get_nowait()
                self._thread.join(timeout=0.01)
            self._thread = None
        self.stream.load_state_dict(self.state)

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        if state.keys() != self.state.keys():  # raw documents <-> tokenized folder
            raise DataError(f"the checkpoint's data position {sorted(state)} is not this dataset's {sorted(self.state)}; "
                            "resume with the training.dataset_path it was saved with")
        self.state = state
        self.close()


def _build_steps(build_step, steps: queue.Queue, stop: threading.Event) -> None:
    """The prefetch thread: steps in order, then the exception that ended them, if any."""
    while not stop.is_set():
        try:
            steps.put(build_step())
        except Exception as e:
            steps.put(e)
            return
