"""The one Qwen decoder: Qwen2 and Qwen3 are this module with different DecoderArgs flags."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from longctx.models.common.args import DecoderArgs
from longctx.models.common.attention import Attention, AttentionMask, build_attention_mask
from longctx.models.common.rope import rope_cos_sin
from longctx.parallelisms.context_parallel import ContextParallel
from longctx.parallelisms.sharding import copy_full_


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020, arXiv:2002.05202)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate_proj
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up_proj
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down_proj
        # Tokens per tile of the tiled SwiGLU; 0 runs the sequence whole. A memory setting
        # (activation_checkpoint.mlp_chunk_size), set by parallelisms/activation_checkpoint.py.
        self.chunk_size = 0

    def forward(self, x):
        if 0 < self.chunk_size < x.shape[0] * x.shape[1]:
            weights = (self.w1.weight, self.w3.weight, self.w2.weight)
            if torch.is_autocast_enabled(x.device.type):  # autocast does not reach the function's backward: cast here
                dtype = torch.get_autocast_dtype(x.device.type)
                x, weights = x.to(dtype), [w.to(dtype) for w in weights]
            return TiledSwiGLU.apply(x, *weights, self.chunk_size)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TiledSwiGLU(torch.autograd.Function):
    """SwiGLU over tiles of `chunk` tokens, each recomputed in backward: the three [T, hidden]
    intermediates (gate, up, their product) never exist whole, only [chunk, hidden] of them
    (ALST's tiled MLP, Bekman et al. 2025, arXiv:2506.13996). Costs one more MLP forward per
    step. Backward is written out (no nested autograd) so torch.compile traces the block whole.
    Plain-tensor weights only: tensor parallel already splits hidden_dim (refused in validate)."""

    @staticmethod
    def forward(ctx, x, w1, w3, w2, chunk: int):
        ctx.save_for_backward(x, w1, w3, w2)
        ctx.chunk = chunk
        tiles = x.flatten(0, 1).split(chunk)
        return torch.cat([F.linear(F.silu(F.linear(t, w1)) * F.linear(t, w3), w2) for t in tiles]).view_as(x)

    @staticmethod
    def backward(ctx, grad_out):
        x, w1, w3, w2 = ctx.saved_tensors
        # Weight gradients accumulate over tiles in fp32: bf16 partial sums would lose bits per tile.
        dw1, dw3, dw2 = (torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in (w1, w3, w2))
        dx = []
        for t, g in zip(x.flatten(0, 1).split(ctx.chunk), grad_out.flatten(0, 1).split(ctx.chunk)):
            gate, up = F.linear(t, w1).float(), F.linear(t, w3).float()  # [chunk, hidden]
            sig = torch.sigmoid(gate)
            act = gate * sig  # silu(gate)
            dh = F.linear(g, w2.t()).float()  # dL/d(act * up)
            dw2 += (g.t() @ (act * up).to(x.dtype)).float()
            dgate = (dh * up * sig * (1 + gate * (1 - sig))).to(x.dtype)  # silu'(z) = sig(z)(1 + z(1 - sig(z)))
            dup = (dh * act).to(x.dtype)
            dx.append(F.linear(dgate, w1.t()) + F.linear(dup, w3.t()))
            dw1 += (dgate.t() @ t).float()
            dw3 += (dup.t() @ t).float()
        return torch.cat(dx).view_as(x), dw1.to(w1.dtype), dw3.to(w3.dtype), dw2.to(w2.dtype), None


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
        if torch.is_autocast_enabled(h.device.type):  # the residual stream in the compute dtype, as under FSDP's bf16 weights
            h = h.to(torch.get_autocast_dtype(h.device.type))
        rope = rope_cos_sin(position_ids, self.args.head_dim, self.args.rope_theta, h.dtype, self.args.rope_scaling)
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
