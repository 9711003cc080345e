"""Grouped-query attention with per-document causal masking and the context-parallel exchange.

Local head counts come from tensor sizes, so the same code runs unsharded and tensor-parallel.
Attention runs per query chunk: one chunk (the whole row) without sequence sharding, two head-tail
chunks with it (parallelisms/context_parallel.py); a chunk at [start, end) sees keys [0, end).
"""

import contextlib
import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from longctx.models.common.args import DecoderArgs
from longctx.models.common.rope import apply_rope
from longctx.parallelisms import context_parallel
from longctx.parallelisms.context_parallel import ContextParallel

# SDPA kernels tried in this order on CUDA; the first that accepts the inputs runs. Measured on
# an H100 (torch 2.11, causal, 16 q / 8 kv heads, fwd+bwd): cuDNN 469-585 TFLOP/s, flash 258-330;
# both take GQA natively; the memory-efficient kernel refuses enable_gqa.
# `benchmarks/probe_attention.py` re-measures (docs/performance.md).
SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class QueryChunk(NamedTuple):
    """Queries at global positions [start, start + length), keys [0, start + length)."""

    start: int
    length: int
    # None: plain causal (start 0, one document per row); a bool tensor [B, 1, length, start +
    # length] (CPU); a flex BlockMask (CUDA).
    mask: None | torch.Tensor | BlockMask


AttentionMask = list[QueryChunk]


@functools.cache
def _compiled_create_block_mask():
    # Eager create_block_mask materializes the dense [Q, KV] mask before reducing it to blocks;
    # compiled, it never does (torchtitan compiles it for the same reason).
    return torch.compile(create_block_mask)


def _chunk_mask(document_ids: torch.Tensor | None, start: int, length: int, device) -> None | torch.Tensor | BlockMask:
    """Per-document causal mask of queries [start, start + length) against keys [0, start + length)."""
    if document_ids is None and start == 0:
        return None
    end = start + length

    def document_causal(b, h, q_idx, kv_idx):
        causal = q_idx + start >= kv_idx
        return causal if document_ids is None else causal & (document_ids[b, q_idx + start] == document_ids[b, kv_idx])

    bsz = 1 if document_ids is None else document_ids.size(0)
    if device.type == "cuda":
        return _compiled_create_block_mask()(document_causal, bsz, None, length, end, device=device)
    # CPU: a dense mask for SDPA, because flex attention has no CPU backward (torch 2.13).
    b, q_idx, kv_idx = (torch.arange(n, device=device) for n in (bsz, length, end))
    return document_causal(b[:, None, None], None, q_idx[:, None], kv_idx).reshape(-1, 1, length, end)


def build_attention_mask(document_ids: torch.Tensor | None, chunks: list[tuple[int, int]], device) -> AttentionMask:
    """Each local query chunk's slice of the per-document causal mask, built once per step.

    document_ids: [B, T] over the whole row, equal ids mark one document; None means each row is
    one document. chunks: (global start, length) of the local query chunks. CUDA gets flex-attention
    BlockMasks (fully masked blocks are skipped; no [T, T] mask ever exists), CPU dense masks."""
    return [QueryChunk(start, length, _chunk_mask(document_ids, start, length, device)) for start, length in chunks]


@functools.cache
def _compiled_flex_attention():
    # flex attention is only fast (and memory-light) when compiled; compiling it once here also
    # serves eager runs. Inside a compiled block, dynamo inlines flex_attention directly.
    return torch.compile(flex_attention, dynamic=False)


def attention_kernel(q, k, v, mask: None | torch.Tensor | BlockMask, kv_groups: int = 1) -> torch.Tensor:
    """q [B, Tq, H, D], k/v [B, Tk, KV, D] -> [B, Tq, H, D].

    kv_groups > 1 runs the kernel once per group of kv heads (with their query heads). The result
    is the same; backward then runs group after group, so only one group's share of the kernel's
    working memory is live at a time: its fp32 dq accumulator and, under GQA, dk and dv expanded to
    every query head (at 1M tokens of Qwen3-0.6B, 28 KiB per token at once)."""
    groups = math.gcd(kv_groups, k.size(2))
    if groups > 1:
        parts = zip(q.chunk(groups, dim=2), k.chunk(groups, dim=2), v.chunk(groups, dim=2))
        return torch.cat([attention_kernel(*qkv, mask) for qkv in parts], dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if isinstance(mask, BlockMask):
        flex = flex_attention if torch.compiler.is_compiling() else _compiled_flex_attention()
        out = flex(q, k, v, block_mask=mask, enable_gqa=True)
    else:
        with sdpa_kernel(SDPA_BACKENDS, set_priority=True) if q.is_cuda else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    return out.transpose(1, 2)


def chunked_attention(q, k, v, mask: AttentionMask, kv_groups: int = 1) -> torch.Tensor:
    """q [B, Tq, H, D] (the query chunks back to back), k/v [B, T, KV, D] in token order -> [B, Tq, H, D].
    Each chunk meets every key it may see in one kernel call, so nothing needs merging."""
    outs, row = [], 0
    for chunk in mask:
        end = chunk.start + chunk.length
        outs.append(attention_kernel(q[:, row : row + chunk.length], k[:, :end], v[:, :end], chunk.mask, kv_groups))
        row += chunk.length
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


class Attention(nn.Module):
    def __init__(self, args: DecoderArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = nn.RMSNorm(args.head_dim, eps=args.norm_eps) if args.qk_norm else None
        self.k_norm = nn.RMSNorm(args.head_dim, eps=args.norm_eps) if args.qk_norm else None
        # Set by parallelize_decoder (models/common/parallelize.py): the groups of the context-parallel
        # exchanges (None: attention on local tokens only), and how many kv-head groups attention runs in.
        self.context_parallel: ContextParallel | None = None
        self.kv_groups = 1

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask) -> torch.Tensor:
        bsz, seq, _ = x.shape  # seq = T/cp
        q = self.wq(x).view(bsz, seq, -1, self.head_dim)  # [B, T/cp, H/tp, D]
        k = self.wk(x).view(bsz, seq, -1, self.head_dim)  # [B, T/cp, KV/tp, D]
        v = self.wv(x).view(bsz, seq, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, k, *rope)  # rope holds the global positions of the local tokens
        cp = self.context_parallel
        if cp is not None:
            # q [B, T/shard, H/(tp*ulysses), D] of this shard's chunks; k, v [B, T, ., D] of the row
            q, k, v = context_parallel.exchange_qkv(q, k, v, cp)
        out = chunked_attention(q, k, v, mask, self.kv_groups)
        if cp is not None:
            out = context_parallel.restore_heads(out, cp)  # [B, T/cp, H/tp, D]
        return self.wo(out.reshape(bsz, seq, -1))
