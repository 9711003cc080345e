"""The one Qwen decoder: Qwen2 and Qwen3 are this module with different DecoderArgs flags."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.common.args import DecoderArgs
from models.common.attention import Attention, AttentionMask, build_attention_mask
from models.common.rope import rope_cos_sin
from parallelisms.context_parallel import ContextParallel
from parallelisms.sharding import copy_full_


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020, arXiv:2002.05202)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate_proj
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up_proj
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down_proj

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: DecoderArgs):
        super().__init__()
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(self, x, rope, mask: AttentionMask):
        h = x + self.attention(self.attention_norm(x), rope, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Decoder(nn.Module):
    """tokens [B, T_local] -> logits [B, T_local, vocab], or whatever `head` makes of the hidden states.

    A recipe passes `head(h, output)` (e.g. the chunked loss of models/common/loss.py) so the
    [T, vocab] logits never exist at once. The head runs inside forward on purpose: under FSDP the
    root group (embedding, norm, output) is unsharded only for the duration of forward/backward."""

    def __init__(self, args: DecoderArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A ModuleDict keyed by layer index keeps checkpoint names stable when blocks are wrapped.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(args.n_layers)})
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Set by parallelisms' context-parallel step: which query chunks this rank attends for.
        self.context_parallel: ContextParallel | None = None

    def forward(self, tokens, position_ids=None, document_ids: torch.Tensor | None = None, head=None):
        """position_ids: [B, T_local] global per-document positions of the local tokens.
        document_ids: [B, T] over the FULL sequence (global even under context parallel)."""
        if position_ids is None:
            position_ids = torch.arange(tokens.size(1), device=tokens.device).expand_as(tokens)
        # clone(): a compiled block whose first op is a sequence-parallel norm, fed the local view
        # of a RowwiseParallel embedding output, gets a wrong embedding gradient (docs/design.md, traps).
        h = self.tok_embeddings(tokens).clone()
        rope = rope_cos_sin(position_ids, self.args.head_dim, self.args.rope_theta, h.dtype)
        cp = self.context_parallel
        chunks = cp.query_chunks(tokens.size(1)) if cp is not None else [(0, tokens.size(1))]
        mask = build_attention_mask(document_ids, chunks, tokens.device)
        for layer in self.layers.values():
            h = layer(h, rope, mask)
        h = self.norm(h)
        return head(h, self.output) if head is not None else self.output(h)

    def to_empty(self, *, device, recurse: bool = True):
        super().to_empty(device=device, recurse=recurse)
        # Moving plain tensors off the meta device makes a new Parameter per module, which unties
        # the embedding and the output projection; DTensor parameters (TP/FSDP) are swapped in
        # place and stay tied.
        if self.args.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight
        return self

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02):
        """Initialize parameters in place (after `to_empty` from the meta device).

        Each parameter is drawn whole from a generator seeded by (seed, its index) and then
        sharded, so a random init is identical under every parallel layout: runs of any mesh
        start from the same weights as one process. Output projections of residual branches are
        scaled down by depth (GPT-2, Radford et al. 2019)."""
        for index, (name, param) in enumerate(self.named_parameters()):  # a tied weight appears once
            full = torch.empty(param.shape, dtype=param.dtype, device=param.device)
            generator = torch.Generator(param.device).manual_seed(seed * 1_000_003 + index)
            if name.endswith("norm.weight"):
                nn.init.ones_(full)
            elif name.endswith(".bias"):
                nn.init.zeros_(full)
            elif name.endswith("tok_embeddings.weight"):
                nn.init.normal_(full, std=std, generator=generator)
            else:
                scaled = std / math.sqrt(2 * self.args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else std
                nn.init.trunc_normal_(full, std=scaled, a=-3 * scaled, b=3 * scaled, generator=generator)
            copy_full_(param, full)
