"""Packing documents into fixed-length rows.

A packed row carries everything a step needs, computed here once on the data side:
  input_ids    [T]  tokens of several documents back to back (EOS closes each document)
  labels       [T]  next token WITHIN the document, shifted on the full row before any sharding;
                    a document's last position and padding get IGNORE_INDEX
  position_ids [T]  restart at 0 at every document start (RoPE positions)
  document_ids [T]  which document a token belongs to (the attention mask; padding is its own)
  ...          [T]  per-token floats a recipe adds (the policy's advantages, old log-probs)
"""

import itertools
from typing import NamedTuple

import numpy as np
import torch

from longctx.base import IGNORE_INDEX, DataError, log


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


class RowPlan(NamedTuple):
    """A row of a step before any tensor exists: the lengths of its pieces of documents, in order
    (what its cost depends on, data/balance.py), and what its stream builds it from."""

    lengths: tuple[int, ...]
    source: tuple | int  # PackedStream: one segment per length; TokenStream: the row's first stream token


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


class PackedStream:
    """Endless packed rows over `documents`, epoch after epoch; its state resumes it exactly.

    `encode(record)` returns (tokens, labels, *extras): one per-token float list per name in
    extra_fields. A document longer than the room left in a row continues at the start of the
    next row (its labels still point at its own next tokens; its positions restart), unless
    split_documents=False (SFT, policy: a token's loss is right only if it sees its whole prompt):
    then it starts the next row whole, and one longer than the row is cut to the row's length
    (each kept token still sees everything before it). Each pass over the documents says how many
    were cut, and a pass whose documents keep no labelled token is refused.

    Rows depend on every document before them, so every rank encodes the whole global stream:
    fine for small data; a large corpus is tokenized once (data/token_shards.py)."""

    def __init__(self, documents, encode, pad_id: int, extra_fields: tuple[str, ...] = (),
                 split_documents: bool = True, name: str = "documents"):
        if len(documents) == 0:
            raise DataError(f"{name}: the dataset has no documents")
        self.documents, self.encode, self.pad_id = documents, encode, pad_id
        self.extra_fields, self.split_documents, self.name = extra_fields, split_documents, name
        self.whole_documents = not split_documents  # each segment a whole document: a step's rows may be re-packed
        self.doc_index = 0  # documents consumed so far, over all epochs
        self.carry: tuple[list, ...] | None = None  # (tokens, labels, *extras) left for the next row
        self.cut = self.labelled = 0  # documents cut to a row, labelled tokens kept: in the current pass

    def plan_rows(self, count: int, row) -> list[RowPlan]:
        """Advance `count` rows of row.tokens: each row's segments, encoded but not yet tensors.
        Rows depend on every document before them, so all of a step's rows are planned."""
        plans = []
        for _ in range(count):
            segments = self._next_segments(row.tokens)
            plans.append(RowPlan(tuple(len(segment[0]) for segment in segments), tuple(segments)))
        return plans

    def build_row(self, plan: RowPlan, row) -> dict[str, torch.Tensor]:
        """The planned row's tensors, padded to row.padded."""
        return pack_row(list(plan.source), row.padded, self.pad_id, self.extra_fields)

    def next_rows(self, count: int, wanted: list[int], row) -> list[dict[str, torch.Tensor]]:
        """Advance `count` rows; return those at the offsets in `wanted` as tensors."""
        plans = self.plan_rows(count, row)
        return [self.build_row(plans[offset], row) for offset in wanted]

    def _next_segments(self, tokens: int) -> list[tuple]:
        segments, used = [], 0
        while used < tokens:
            if self.carry is not None:
                segment, self.carry = self.carry, None
            else:
                segment = self._next_document(tokens)
            room, length = tokens - used, len(segment[0])
            if length > room and not self.split_documents:
                if used:  # it starts the next row
                    self.carry = segment
                    break
                segment = tuple(s[:tokens] for s in segment)  # a carried document longer than a shorter stage's row
            elif length > room:
                segment, self.carry = tuple(s[:room] for s in segment), tuple(s[room:] for s in segment)
            if length:
                segments.append(segment)
                used += len(segment[0])
        return segments

    def _next_document(self, tokens: int) -> tuple:
        """The next document's segment; whole-document streams cut it to `tokens` and count it."""
        index = self.doc_index % len(self.documents)
        segment = self.encode(self.documents[index])
        self.doc_index += 1
        if not self.split_documents:
            self.cut += len(segment[0]) > tokens
            segment = tuple(s[:tokens] for s in segment)
            self.labelled += sum(label != IGNORE_INDEX for label in segment[1])
        if index == len(self.documents) - 1:
            self._end_pass(tokens)
        return segment

    def _end_pass(self, tokens: int) -> None:
        if self.cut:
            log(f"{self.name}: {self.cut} of {len(self.documents)} were cut to rows of {tokens} tokens in this pass; "
                "raise training.seq_len (or the schedule's stage) to train them whole")
        if not self.split_documents and not self.labelled:
            raise DataError(f"{self.name}: no document keeps a labelled token within rows of {tokens} tokens; "
                            "raise training.seq_len (or the schedule's stage)")
        self.cut = self.labelled = 0

    def state_dict(self) -> dict:
        return {"doc_index": self.doc_index, "carry": self.carry, "cut": self.cut, "labelled": self.labelled}

    def load_state_dict(self, state: dict) -> None:
        self.doc_index, self.carry, self.cut, self.labelled = state["doc_index"], state["carry"], state["cut"], state["labelled"]
