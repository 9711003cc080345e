"""Cross-entropy over a 152K vocabulary without ever holding the [T, vocab] logits.

The output projection and the loss run one sequence chunk at a time. Peak memory is one chunk of
logits (plus its gradient) instead of T x vocab fp32 (32K tokens x 152K vocab = 18.5 GiB).

- The loss sum (plain tensors: one GPU, dp, cp) takes the gradient of each chunk in the same pass
  as its loss (`_FusedLinearCrossEntropy`, the approach of Liger-Kernel's fused linear
  cross-entropy): no logits are recomputed, and on CUDA the softmax, the loss and the logits'
  gradient are one compiled pass over each chunk. It holds dL/dh [T, dim] and dL/dW [vocab, dim]
  (fp32) until backward.
- Under tensor parallel (DTensor weights, loss parallel) and for per-token log-probs, each chunk
  runs under activation checkpointing instead: backward recomputes that chunk's logits, at the
  cost of one extra output matmul per token.
"""

import functools

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


def _linear_ce_chunk(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    """h [C, dim], weight [V, dim], labels [C] -> (loss sum, dL/dh [C, dim], dL/dlogits [C, V]).

    dL/dlogits = softmax(logits) - onehot(label), zero on ignored rows; written in h's dtype like
    the gradient autograd would give the logits."""
    logits = (h @ weight.t()).float()  # [C, V]; fp32 for a stable log-softmax
    lse = logits.logsumexp(dim=-1)
    valid = labels != IGNORE_INDEX
    target = labels.clamp(min=0)
    loss = torch.where(valid, lse - logits.gather(1, target[:, None]).squeeze(1), 0.0).sum()
    vocab = torch.arange(logits.size(1), device=logits.device)
    probs = (logits - lse[:, None]).exp()
    grad = torch.where(vocab[None, :] == target[:, None], probs - 1.0, probs)
    grad = torch.where(valid[:, None], grad, 0.0).to(h.dtype)  # [C, V]
    return loss, grad @ weight, grad


def _add_product(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc + a @ b in fp32 (a @ b when acc is None). On CUDA a bf16 product is summed in the matmul's
    own fp32 accumulator and added into acc by the matmul itself (cuBLAS beta = 1): no bf16 rounding
    of each chunk's share, no separate pass over the [vocab, dim] sum (H100, 1.7B at 8K tokens: two
    1.3-ms adds and a 0.4-ms fill per step before)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cuda", enabled=False):
            if acc is None:
                return torch.mm(a, b, out_dtype=torch.float32)
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    product = (a @ b).float()
    return product if acc is None else acc.add_(product)


@functools.cache
def _compiled_linear_ce_chunk():
    # Eager, every step of the softmax and its gradient is its own pass over a [chunk, vocab] fp32
    # block; compiled, they fuse into one reduction kernel over the bf16 logits that writes their
    # gradient (H100, 0.6B, 8K tokens: 3.5 ms per step, next to 10 ms of output matmuls).
    return torch.compile(_linear_ce_chunk, dynamic=False)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """loss_sum = CE(h @ W^T, labels) summed, with both gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h, weight, labels, chunk_size):
        chunk_fn = _compiled_linear_ce_chunk() if h.is_cuda else _linear_ce_chunk
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        ctx.h_shape, ctx.weight_dtype = h.shape, weight.dtype
        h2, flat_labels = h.reshape(-1, h.size(-1)), labels.reshape(-1)
        grad_h = torch.empty_like(h2) if need_grad else None
        if torch.is_autocast_enabled(h.device.type):  # cast once here, not in every chunk's matmuls
            dtype = torch.get_autocast_dtype(h.device.type)
            h2, weight = h2.to(dtype), weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_w = None
        for start in range(0, h2.size(0), chunk_size):
            end = min(start + chunk_size, h2.size(0))
            chunk_loss, chunk_grad_h, grad_logits = chunk_fn(h2[start:end], weight, flat_labels[start:end])
            loss += chunk_loss
            if need_grad:
                grad_h[start:end] = chunk_grad_h
                grad_w = _add_product(grad_w, grad_logits.t(), h2[start:end])  # fp32 across chunks
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = (grad_h * grad_loss).view(ctx.h_shape) if ctx.needs_input_grad[0] else None
        grad_w = (grad_w * grad_loss).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None


def chunked_cross_entropy_sum(h, output: nn.Module, labels, chunk_size: int = 4096) -> torch.Tensor:
    """Sum of token cross-entropies over labels != IGNORE_INDEX. h [B, T, dim], labels [B, T].

    A sum, not a mean: the caller divides by the GLOBAL count of valid tokens, so shards whose
    labels are all ignored contribute 0 instead of NaN, and every parallel layout gets the same
    gradient as one process."""
    if not isinstance(h, DTensor) and not isinstance(output.weight, DTensor) and output.bias is None:
        return _FusedLinearCrossEntropy.apply(h, output.weight, labels, chunk_size)
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
