"""Row lengths and the step loader: per step, this rank's micro-batches of the global batch, built
ahead in a thread.

The row length of every step has one owner, the `RowSchedule` (training.seq_len_schedule, or one
stage of training.seq_len, padded for the layout by ParallelDims.padded_len). The loader hands
each stream the length of the step it builds, and each `Step` carries it on to the training loop
(metrics, flops); no recipe and no stream decides a length of its own.

A step is planned whole first (`Stream.plan_rows`: each row's pieces of documents, no tensor),
arranged so that dealing by position balances the ranks' work (data/balance.py), and only this
rank's rows become tensors (`Stream.build_row`).
"""

import queue
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from longctx.base import DataError, round_up
from longctx.data.balance import DocumentCost, deal, repack, synced_cost
from longctx.data.packing import RowPlan, collate


class RowLength(NamedTuple):
    tokens: int  # tokens of documents one row holds (the stage's seq_len)
    padded: int  # the row's length on the device: tokens rounded up for the layout, padding masked


@dataclass(frozen=True)
class RowSchedule:
    """Step -> RowLength. Stages are (first step, tokens), the first starting at step 0; steps count
    from 1. A function of the step alone, so a resumed run lands in its stage."""

    stages: tuple[tuple[int, int], ...]
    multiple: int  # ParallelDims.seq_multiple: every cp and sequence-parallel rank gets equal pieces

    @classmethod
    def from_training(cls, training, multiple: int) -> "RowSchedule":
        """training.seq_len_schedule (checked by launch.validate), else training.seq_len throughout."""
        stages = training.seq_len_schedule or [(0, training.seq_len)]
        return cls(tuple((int(start), int(tokens)) for start, tokens in stages), multiple)

    @classmethod
    def constant(cls, tokens: int, multiple: int) -> "RowSchedule":
        return cls(((0, tokens),), multiple)

    def at(self, step: int) -> RowLength:
        return self._row([length for start, length in self.stages if start <= step][-1])

    @property
    def longest(self) -> RowLength:
        return self._row(max(length for _, length in self.stages))

    def _row(self, tokens: int) -> RowLength:
        return RowLength(tokens, round_up(tokens, self.multiple))


class Stream(Protocol):
    """Endless rows (data/packing.PackedStream, data/token_shards.TokenStream); its state resumes it exactly."""

    whole_documents: bool  # every piece of its rows is a whole document, so a step's rows may be re-packed

    def plan_rows(self, count: int, row: RowLength) -> list[RowPlan]:
        """Advance `count` rows of `row` length: what each holds, before any tensor."""
        ...

    def build_row(self, plan: RowPlan, row: RowLength) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Step(NamedTuple):
    microbatches: list[dict[str, torch.Tensor]]  # this rank's, [local_batch_size, row.padded] each
    row: RowLength


class StepLoader:
    """Per step, this rank's micro-batches of the global batch, built ahead in a background thread.

    The global batch is one stream's next global_batch_size rows whatever the layout, so the loss
    and gradients are identical under any dp/cp/tp; cp and tp ranks get the same rows and shard
    them later. Micro-batch m of dp rank r holds rows [(m*dp + r)*b, (m*dp + r + 1)*b) of the
    step's global batch, arranged first so that this dealing evens out the ranks' work when
    `balance` (the document cost model, data/balance.py) is given; a rank builds tensors for its
    own rows only.

    A thread keeps up to `prefetch` steps ready while the accelerator runs the current one (as
    torch's DataLoader workers do). A thread, not processes: the tokenized path's work is a few
    memory-map slices and array copies, which release the GIL; the on-the-fly path's Python
    packing does share the GIL with the loop (small data only). The state is the position after
    the last step handed out, not the thread's: a checkpoint never skips the prefetched steps."""

    def __init__(self, stream: Stream, schedule: RowSchedule, local_batch_size: int, global_batch_size: int, dp: int,
                 dp_rank: int, prefetch: int = 2, balance: DocumentCost | None = None):
        if global_batch_size % (local_batch_size * dp):
            raise DataError(
                f"global_batch_size={global_batch_size} is not a multiple of local_batch_size*dp = "
                f"{local_batch_size}*{dp}; gradient accumulation needs whole micro-batches"
            )
        self.stream, self.schedule = stream, schedule
        self.local_batch_size, self.global_batch_size = local_batch_size, global_batch_size
        self.dp, self.dp_rank, self.prefetch = dp, dp_rank, prefetch
        self.balance = balance  # None: the stream's rows in its order (validation, training.balance = "none")
        self.grad_accum_steps = global_batch_size // (local_batch_size * dp)
        self.state = stream.state_dict()
        self.wait_seconds = 0.0  # time next_step spent blocked on the thread, over the run
        self._thread, self._next = None, None  # the thread, and the step it hands out next

    def owned_rows(self) -> list[int]:
        """This rank's offsets in a step's global batch, micro-batch after micro-batch."""
        b = self.local_batch_size
        return [(m * self.dp + self.dp_rank) * b + i for m in range(self.grad_accum_steps) for i in range(b)]

    def build_step(self, step: int) -> tuple[Step, dict]:
        """Step `step`'s micro-batches and the stream's state after it (the thread's work)."""
        row, b = self.schedule.at(step), self.local_batch_size
        plans = self.arrange(self.stream.plan_rows(self.global_batch_size, row), row)
        rows = [self.stream.build_row(plans[offset], row) for offset in self.owned_rows()]
        return Step([collate(rows[m * b : (m + 1) * b]) for m in range(self.grad_accum_steps)], row), self.stream.state_dict()

    def arrange(self, plans: list[RowPlan], row: RowLength) -> list[RowPlan]:
        """The step's rows in the order that dealing by position balances: the stream's rows dealt
        by cost, or for whole documents the step's documents re-packed by cost and dealt, whichever
        the cost model finds fastest; the stream's order unless one is strictly faster. The same
        documents in every case, and the same answer on every rank (a function of their lengths)."""
        if self.balance is None:
            return plans
        options = [plans, self.dealt(plans, row)]
        if self.stream.whole_documents:
            repacked = repacked_rows(plans, row.tokens, self.balance)
            if repacked is not None:
                options.append(self.dealt(repacked, row))
        return min(options, key=lambda option: synced_cost(self.row_costs(option, row), self.dp, self.local_batch_size))

    def row_costs(self, plans: list[RowPlan], row: RowLength) -> list[int]:
        return [self.balance.row(plan.lengths, row.padded) for plan in plans]

    def dealt(self, plans: list[RowPlan], row: RowLength) -> list[RowPlan]:
        return [plans[i] for i in deal(self.row_costs(plans, row), self.dp, self.grad_accum_steps, self.local_batch_size)]

    def next_step(self, step: int) -> Step:
        """Step `step` (counting from 1): the next after the last one handed out, or after the
        position a checkpoint restored."""
        if self._thread is not None and step != self._next:
            self.close()
        if self._thread is None:
            self._queue, self._stop = queue.Queue(maxsize=self.prefetch), threading.Event()
            self._thread = threading.Thread(target=_build_steps, args=(self.build_step, step, self._queue, self._stop),
                                            name="StepLoader", daemon=True)
            self._thread.start()
        self._next = step + 1
        start = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - start
        if isinstance(item, Exception):
            self.close()
            raise item  # e.g. a DataError met while packing: the user's one line, from this thread
        built, self.state = item
        return built

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


def repacked_rows(plans: list[RowPlan], capacity: int, cost: DocumentCost) -> list[RowPlan] | None:
    """The whole documents of `plans` re-packed by cost into as many rows (balance.repack); None
    when they do not fit that way."""
    pieces = [(length, segment) for plan in plans for length, segment in zip(plan.lengths, plan.source)]
    groups = repack([length for length, _ in pieces], len(plans), capacity, cost)
    if groups is None:
        return None
    return [RowPlan(tuple(pieces[i][0] for i in group), tuple(pieces[i][1] for i in group)) for group in groups]


def _build_steps(build_step, first: int, steps: queue.Queue, stop: threading.Event) -> None:
    """The prefetch thread: steps first, first + 1, ... in order, then the exception that ended them, if any."""
    step = first
    while not stop.is_set():
        try:
            steps.put(build_step(step))
        except Exception as e:
            steps.put(e)
            return
        step += 1

