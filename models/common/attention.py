"""Grouped-query attention with per-document causal masking and the Ulysses context-parallel exchange.

Local head counts come from tensor sizes, so the same code runs unsharded and tensor-parallel.
"""

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from models.common.args import DecoderArgs
from models.common.rope import apply_rope
from parallelisms import ulysses

# None: one causal document per row; a bool tensor [B, 1, T, T] (CPU); a flex BlockMask (CUDA).
AttentionMask = None | torch.Tensor | BlockMask

# SDPA kernels tried in this order on CUDA; the first that accepts the inputs runs. Measured on
# an H100 (torch 2.11, causal, 16 q / 8 kv heads, fwd+bwd): cuDNN 469-585 TFLOP/s, flash 258-330;
# both take GQA natively; the memory-efficient kernel refuses enable_gqa.
# `scripts/bench.py --probe-attention` re-measures (docs/performance.md).
SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def build_attention_mask(document_ids: torch.Tensor | None) -> AttentionMask:
    """Per-document causal mask over the full (global) sequence, built once per step.

    document_ids: [B, T], equal ids mark one document; None means each row is one document.
    CUDA gets a flex-attention BlockMask (skips fully masked blocks); CPU gets a dense boolean
    mask for SDPA, because flex attention has no CPU backward (torch 2.13)."""
    if document_ids is None:
        return None
    bsz, seq = document_ids.shape
    if document_ids.is_cuda:

        def document_causal(b, h, q_idx, kv_idx):
            return (document_ids[b, q_idx] == document_ids[b, kv_idx]) & (q_idx >= kv_idx)

        return create_block_mask(document_causal, bsz, None, seq, seq, device=document_ids.device)
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    return (same_doc & causal).unsqueeze(1)


@functools.cache
def _compiled_flex_attention():
    # flex attention is only fast (and memory-light) when compiled; compiling it once here also
    # serves eager runs. Inside a compiled block, dynamo inlines flex_attention directly.
    return torch.compile(flex_attention, dynamic=False)


def attention_kernel(q, k, v, mask: AttentionMask) -> torch.Tensor:
    """q [B, T, H, D], k/v [B, T, KV, D] -> [B, T, H, D]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if isinstance(mask, BlockMask):
        flex = flex_attention if torch.compiler.is_compiling() else _compiled_flex_attention()
        out = flex(q, k, v, block_mask=mask, enable_gqa=True)
    else:
        with sdpa_kernel(SDPA_BACKENDS, set_priority=True) if q.is_cuda else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    return out.transpose(1, 2)


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
        # Set by parallelisms' context-parallel step; None runs attention on local tokens only.
        self.cp_group: torch.distributed.ProcessGroup | None = None

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask) -> torch.Tensor:
        bsz, seq, _ = x.shape  # seq = T/cp
        q = self.wq(x).view(bsz, seq, -1, self.head_dim)  # [B, T/cp, H/tp, D]
        k = self.wk(x).view(bsz, seq, -1, self.head_dim)  # [B, T/cp, KV/tp, D]
        v = self.wv(x).view(bsz, seq, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, k, *rope)  # rope holds the global positions of the local tokens
        if self.cp_group is not None:
            q, k, v = ulysses.scatter_heads_gather_seq(q, k, v, self.cp_group)  # [B, T, H/(tp*cp), D]
        out = attention_kernel(q, k, v, mask)
        if self.cp_group is not None:
            out = ulysses.gather_heads_scatter_seq(out, self.cp_group)  # [B, T/cp, H/tp, D]
        return self.wo(out.reshape(bsz, seq, -1))
