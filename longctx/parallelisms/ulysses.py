"""Ulysses, the head dimension of context parallelism: the two all-to-all exchanges of attention.

Each rank of a Ulysses group of cp ranks holds a piece of the group's tokens (the whole row
without sequence sharding, parallelisms/context_parallel.py). Around attention, one all-to-all turns
"local tokens, all local heads" into "the group's tokens, 1/cp of the heads" and one turns it back
(DeepSpeed-Ulysses, Jacobs et al. 2023, arXiv:2309.14509). Both are
`_functional_collectives.all_to_all_single`, which is differentiable (its backward is the inverse
all-to-all) and traceable by torch.compile; a hand-written autograd op with in-place buffers
silently produced zero q/k/v gradients under compile in another implementation (docs/design.md).
"""

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


def kv_heads_to_send(n_kv_heads_local: int, degree: int) -> int | None:
    """GQA under Ulysses: each rank needs the kv heads of its query heads. With fewer local kv
    heads than ranks, each kv head is replicated so every rank receives exactly one. None: the kv
    heads can be neither split nor replicated (ParallelDims refuses such a layout before any
    process group, so the exchange below never meets one)."""
    if n_kv_heads_local % degree == 0:
        return n_kv_heads_local
    if degree % n_kv_heads_local == 0:
        return degree
    return None


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """all_to_all_single over dim 0 (equal splits), differentiable; returns a waited tensor."""
    out = funcol.all_to_all_single(x.contiguous(), None, None, group)
    return funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out


def scatter_heads_gather_seq(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T/cp, H, D], [B, T/cp, KV, D] x2  ->  [B, T, H/cp, D], [B, T, KV'/cp, D] x2.

    Forward: one all-to-all carrying q, k and v together. Backward: the inverse all-to-all.
    KV' = KV, or cp when KV < cp (kv heads replicated, see kv_heads_to_send)."""
    cp = dist.get_world_size(group)
    bsz, t_local, n_heads, head_dim = q.shape
    n_kv = kv_heads_to_send(k.size(2), cp)
    if n_kv != k.size(2):
        k = k.repeat_interleave(n_kv // k.size(2), dim=2)
        v = v.repeat_interleave(n_kv // v.size(2), dim=2)
    # Group heads by destination rank: [B, T/cp, cp, heads_per_rank, D] for q, k and v side by side.
    packed = torch.cat(
        [t.reshape(bsz, t_local, cp, t.size(2) // cp, head_dim) for t in (q, k, v)], dim=3
    )
    packed = packed.permute(2, 0, 1, 3, 4)  # [cp (dest), B, T/cp, h, D]
    received = _all_to_all(packed, group)  # [cp (source = sequence chunk), B, T/cp, h, D]
    full = received.permute(1, 0, 2, 3, 4).reshape(bsz, cp * t_local, -1, head_dim)
    return full.split([n_heads // cp, n_kv // cp, n_kv // cp], dim=2)


def gather_heads_scatter_seq(out: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, T, H/cp, D] -> [B, T/cp, H, D]. Forward: one all-to-all. Backward: the inverse."""
    cp = dist.get_world_size(group)
    bsz, seq, heads, head_dim = out.shape
    chunks = out.reshape(bsz, cp, seq // cp, heads, head_dim).permute(1, 0, 2, 3, 4)
    received = _all_to_all(chunks, group)  # [cp (source = head group), B, T/cp, H/cp, D]
    return received.permute(1, 2, 0, 3, 4).reshape(bsz, seq // cp, cp * heads, head_dim)
