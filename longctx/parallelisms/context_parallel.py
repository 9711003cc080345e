"""Context parallelism = Ulysses x sequence sharding, and the head-tail (zigzag) token order.

cp ranks form a (shard, ulysses) grid. Ulysses (parallelisms/ulysses.py) trades sequence for heads
inside a group of `ulysses` ranks; it is capped by the local head counts. The shard dimension splits
the sequence once more, `shard` ways, and gives every rank the keys and values of the WHOLE sequence
by one all-gather (Llama 3's context parallelism, Dubey et al. 2024, arXiv:2407.21783, sec. 3.3.2;
Megatron's `allgather`; torchtitan's CP): each rank then attends its own query chunks to every key
they may see, in one kernel call per chunk, so no partial attentions need merging. Ring attention
(keys passed around in s steps, partial outputs merged by log-sum-exp) would slot in behind
`gather_kv`; docs/performance.md compares the two and says why all-gather is the default.

Causal load balance: the sequence is cut into 2*shard chunks and shard rank i holds chunks i and
2*shard-1-i (head and tail), so every rank's queries see the same number of keys (the causal area of
chunk c grows with c). Inside a shard, its two chunks back to back are cut contiguously into
`ulysses` pieces, one per cp rank: cp rank = shard rank * ulysses + ulysses rank.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from longctx.parallelisms import ulysses


@dataclass(frozen=True)
class ContextParallel:
    """What attention needs of the cp layout: the two groups and this rank's shard index."""

    ulysses_group: dist.ProcessGroup | None  # None: ulysses degree 1
    shard_group: dist.ProcessGroup | None  # None: shard degree 1
    degree: int  # cp = shard x ulysses
    shard: int  # shard degree
    shard_rank: int

    def query_chunks(self, local_seq: int) -> list[tuple[int, int]]:
        """(global start, length) of the query chunks this rank attends for, in local order, once
        the Ulysses exchange has assembled its shard's tokens; local_seq = T/cp."""
        return shard_chunks(local_seq * self.degree, self.shard, self.shard_rank)


def shard_chunks(seq: int, shard: int, shard_rank: int) -> list[tuple[int, int]]:
    """(start, length) of the chunks shard rank `shard_rank` holds: the whole row without sharding,
    else chunks i and 2*shard-1-i of 2*shard equal chunks."""
    if shard == 1:
        return [(0, seq)]
    chunk = seq // (2 * shard)
    return [(shard_rank * chunk, chunk), ((2 * shard - 1 - shard_rank) * chunk, chunk)]


def cp_token_order(seq: int, cp: int, shard: int) -> torch.Tensor:
    """Global token index at each place of the cp-sharded row: cp rank r holds places
    [r*seq/cp, (r+1)*seq/cp). The identity when shard == 1 (contiguous chunks)."""
    if seq % (cp * (2 if shard > 1 else 1)):
        raise ValueError(f"sequence length {seq} is not divisible by {cp} cp ranks x {2 if shard > 1 else 1} chunks each")
    spans = [span for rank in range(shard) for span in shard_chunks(seq, shard, rank)]
    return torch.cat([torch.arange(start, start + length) for start, length in spans])


def slice_for_cp(t: torch.Tensor, cp_rank: int, cp: int, shard: int, dim: int = 1) -> torch.Tensor:
    """This cp rank's tokens of t along dim, in cp_token_order (labels must already be shifted on
    the whole row: a local shift would lose one label per chunk boundary)."""
    if cp == 1:
        return t
    seq = t.size(dim)
    local = cp_token_order(seq, cp, shard)[cp_rank * (seq // cp) : (cp_rank + 1) * (seq // cp)]
    return t.index_select(dim, local.to(t.device))


def unshard_row(chunks: list[torch.Tensor], shard: int) -> torch.Tensor:
    """Per-token values of the cp ranks (rank order, last dim the sequence) -> the row in token order."""
    placed = torch.cat(chunks, dim=-1)
    order = cp_token_order(placed.size(-1), len(chunks), shard).to(placed.device)
    return torch.empty_like(placed).index_copy_(-1, order, placed)


def gather_kv(k: torch.Tensor, v: torch.Tensor, cp: ContextParallel) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T/shard, KV, D] x2 (this shard's two chunks) -> [B, T, KV, D] x2 in token order.

    Forward: one all-gather of k and v together over the shard group. Backward: its
    reduce-scatter (sum) of dK and dV, both from `_functional_collectives` (differentiable and
    traceable by compile). Costs the whole sequence's K/V of the local kv heads per rank; GQA keeps
    that small (docs/performance.md has the numbers)."""
    bsz, t_shard, n_kv, head_dim = k.shape
    gathered = funcol.all_gather_single(torch.stack((k, v)).contiguous(), 0, cp.shard_group)
    if isinstance(gathered, funcol.AsyncCollectiveTensor):
        gathered = funcol.wait_tensor(gathered)
    # [shard, k|v, B, 2 chunks, T/(2*shard), KV, D]: rank i sent chunks i (head) and 2*shard-1-i (tail).
    chunks = gathered.view(cp.shard, 2, bsz, 2, t_shard // 2, n_kv, head_dim)
    in_order = torch.cat((chunks[:, :, :, 0], chunks[:, :, :, 1].flip(0)))  # [2*shard (chunk), k|v, B, T/(2*shard), KV, D]
    k_all, v_all = in_order.permute(1, 2, 0, 3, 4, 5).reshape(2, bsz, -1, n_kv, head_dim)
    return k_all, v_all


def exchange_qkv(q, k, v, cp: ContextParallel):
    """[B, T/cp, H, D], [B, T/cp, KV, D] x2 -> q [B, T/shard, H/ulysses, D] of this shard's query
    chunks and k, v [B, T, KV'/ulysses, D] of the whole sequence in token order."""
    if cp.ulysses_group is not None:
        q, k, v = ulysses.scatter_heads_gather_seq(q, k, v, cp.ulysses_group)
    if cp.shard_group is not None:
        k, v = gather_kv(k, v, cp)
    return q, k, v


def restore_heads(out: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """[B, T/shard, H/ulysses, D] -> [B, T/cp, H, D]: the inverse Ulysses exchange (no-op without it)."""
    if cp.ulysses_group is None:
        return out
    return ulysses.gather_heads_scatter_seq(out, cp.ulysses_group)
