"""Cross-entropy over a 152K vocabulary without ever holding the [T, vocab] logits.

The output projection and the loss run one sequence chunk at a time under activation
checkpointing: forward keeps only each chunk's scalar loss sum, backward recomputes that chunk's
logits. Peak memory is one chunk of logits (plus its gradient) instead of T x vocab fp32
(32K tokens x 152K vocab = 18.5 GiB); the cost is one extra output matmul per token.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_logits(output: nn.Module, h: torch.Tensor) -> torch.Tensor:
    logits = output(h).float()  # fp32 for a stable log-softmax over a large vocabulary
    return logits.flatten(0, 1)


def _chunk_loss_sum(output: nn.Module, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_chunk_logits(output, h), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def _chunk_token_logprobs(output: nn.Module, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # -CE per token is log p(label); ignored positions come back as 0.
    nll = F.cross_entropy(_chunk_logits(output, h), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(labels.shape)


def _chunks(h: torch.Tensor, labels: torch.Tensor, chunk_size: int):
    # Under tensor parallel the final norm yields a sequence-sharded DTensor: gather the hidden
    # states (T x dim, small) once; the output layer then computes vocab-sharded logits per chunk.
    if isinstance(h, DTensor):
        h = h.redistribute(placements=[Replicate()] * h.device_mesh.ndim)
    seq = labels.size(1)
    for start in range(0, seq, chunk_size):
        end = min(start + chunk_size, seq)
        yield h[:, start:end], labels[:, start:end]


def chunked_cross_entropy_sum(h, output: nn.Module, labels, chunk_size: int = 4096) -> torch.Tensor:
    """Sum of token cross-entropies over labels != IGNORE_INDEX. h [B, T, dim], labels [B, T].

    A sum, not a mean: the caller divides by the GLOBAL count of valid tokens, so shards whose
    labels are all ignored contribute 0 instead of NaN, and every parallel layout gets the same
    gradient as one process."""
    sums = [
        checkpoint(_chunk_loss_sum, output, h_chunk, label_chunk, use_reentrant=False)
        for h_chunk, label_chunk in _chunks(h, labels, chunk_size)
    ]
    return _plain(torch.stack(sums).sum())


def chunked_token_logprobs(h, output: nn.Module, labels, chunk_size: int = 4096) -> torch.Tensor:
    """log p(labels) per token, [B, T] fp32 (0 where ignored), never materializing all logits."""
    parts = [
        checkpoint(_chunk_token_logprobs, output, h_chunk, label_chunk, use_reentrant=False)
        for h_chunk, label_chunk in _chunks(h, labels, chunk_size)
    ]
    return _plain(torch.cat(parts, dim=1))


def _plain(t: torch.Tensor) -> torch.Tensor:
    # Loss parallel leaves a replicated DTensor; callers all-reduce plain tensors over dp/cp.
    return t.full_tensor() if isinstance(t, DTensor) else t
