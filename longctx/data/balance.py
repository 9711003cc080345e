"""Work balance of a global batch over dp ranks, from the lengths of its documents alone.

Attention over a packed row skips every pair of tokens of different documents (the document
mask), so a row costs the sum over its documents of cost(L) = a*L + b*L^2, not its token count:
two rows of 64K tokens differ several-fold when one holds a single document and the other a
hundred. a and b come from the model's own flop count (DecoderArgs.flops_per_token, handed over
by train.py: this layer never sees a model). Context and tensor parallelism split every row over
their ranks alike, 1/cp and 1/tp of each row, so they divide all costs by the same factor and
the dp balance compares rows as they are.

Ranks meet at every micro-batch: FSDP gathers each block's weights in forward and reduces its
gradients in backward, a collective of all dp ranks per block. A step therefore lasts the sum
over micro-batches of the slowest rank's micro-batch (`synced_cost`), and balancing means every
micro-batch "wave" even across ranks, not only each rank's total.

Everything here is integer arithmetic on the lengths, with ties broken by index: every rank
computes the same arrangement, and the arrangement of a batch depends on nothing else.
"""

import heapq
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class DocumentCost:
    """Training flops of one document of L tokens in a row: linear*L + quadratic*L^2."""

    linear: int  # flops per token that do not depend on the document (projections, MLP, output)
    quadratic: int  # causal attention flops per L^2 (each token against the half before it)

    @classmethod
    def from_flops_per_token(cls, flops_per_token: Callable[..., int]) -> "DocumentCost":
        """flops_per_token(seq_len, causal=True) is linear + quadratic * seq_len per token
        (models/common/args.py); its value at 0 and its slope give both, so the formula lives once."""
        linear = flops_per_token(0, causal=True)
        return cls(linear, flops_per_token(1, causal=True) - linear)

    def __call__(self, length: int) -> int:
        return self.linear * length + self.quadratic * length * length

    def row(self, lengths: tuple[int, ...], padded: int) -> int:
        """A row of `padded` tokens holding pieces of `lengths`: packed_row makes its padding one
        more causal document, which the device computes like any other."""
        return sum(map(self, lengths)) + self(padded - sum(lengths))


def microbatch_loads(row_costs: list[int], dp: int, local_batch: int) -> list[list[int]]:
    """[micro-batch][dp rank] summed cost of rows dealt by position: micro-batch m of dp rank r
    holds rows [(m*dp + r)*b, (m*dp + r + 1)*b) (data/loader.StepLoader)."""
    b = local_batch
    loads = [sum(row_costs[start : start + b]) for start in range(0, len(row_costs), b)]
    return [loads[m : m + dp] for m in range(0, len(loads), dp)]


def synced_cost(row_costs: list[int], dp: int, local_batch: int) -> int:
    """The step's cost when ranks wait for each other at every micro-batch: the sum over
    micro-batches of the most loaded rank's."""
    return sum(max(wave) for wave in microbatch_loads(row_costs, dp, local_batch))


def partition_equal(costs: list[int], parts: int) -> list[list[int]]:
    """Indices of `costs` in `parts` parts of len(costs) // parts items each, the parts' sums as
    even as Karmarkar and Karp's largest differencing method makes them (1982; the equal-size
    variant verl uses): sort, seed one partial partition per `parts` consecutive items (one item
    per part), then merge the two partial partitions of largest spread, the heaviest part of one
    with the lightest of the other, until one is left."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], i))
    heap = [_partial([(costs[i], [i]) for i in order[first : first + parts]], seed)
            for seed, first in enumerate(range(0, len(order), parts))]
    heapq.heapify(heap)
    while len(heap) > 1:
        _, seed, heavy_first = heapq.heappop(heap)
        _, _, other = heapq.heappop(heap)
        merged = [(a + b, items + more) for (a, items), (b, more) in zip(heavy_first, reversed(other))]
        heapq.heappush(heap, _partial(merged, seed))
    return [sorted(items) for _, items in heap[0][2]]


def _partial(parts: list[tuple[int, list[int]]], seed: int) -> tuple:
    """A heap entry: the largest spread pops first; the seed (unique) settles ties."""
    parts = sorted(parts, key=lambda part: (-part[0], part[1]))
    return -(parts[0][0] - parts[-1][0]), seed, parts


def deal(row_costs: list[int], dp: int, grad_accum: int, local_batch: int) -> list[int]:
    """An order of the step's rows whose dealing by position is balanced: the rows in dp *
    grad_accum groups of local_batch rows of even cost (partition_equal); the groups, heaviest
    first, in waves of dp, one wave per micro-batch (sorted waves keep the sum of their maxima
    low when the groups cannot be even, e.g. one row each); within a wave the heaviest group goes
    to the rank with the least work so far, so the ranks' totals stay even too."""
    groups = partition_equal(row_costs, dp * grad_accum)
    load = [sum(row_costs[i] for i in group) for group in groups]
    heaviest_first = sorted(range(len(groups)), key=lambda g: (-load[g], groups[g]))
    totals, order = [0] * dp, []
    for m in range(grad_accum):
        ranks = sorted(range(dp), key=lambda r: (totals[r], r))  # least loaded first
        slot = {}
        for g, r in zip(heaviest_first[m * dp : (m + 1) * dp], ranks):
            slot[r] = g
            totals[r] += load[g]
        order += [i for r in range(dp) for i in groups[slot[r]]]
    return order


def repack(lengths: list[int], rows: int, capacity: int, cost: DocumentCost) -> list[list[int]] | None:
    """Whole documents into `rows` rows of at most `capacity` tokens each: costliest first, each
    into the row with the least work among those it fits (LPT). Within a row the documents keep
    their stream order. None if a document fits no row: the caller keeps the stream's packing."""
    work, used, groups = [0] * rows, [0] * rows, [[] for _ in range(rows)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(rows) if used[r] + lengths[i] <= capacity]
        if not fits:
            return None
        r = min(fits, key=lambda r: (work[r], r))
        work[r], used[r] = work[r] + cost(lengths[i]), used[r] + lengths[i]
        groups[r].append(i)
    return [sorted(group) for group in groups]
