"""Rotary position embedding (Su et al. 2021, arXiv:2104.09864), in Hugging Face's rotate-half layout
so that checkpoints exchange without permuting q/k weights."""

import torch


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """position_ids [B, T] (per-document, global even under CP) -> cos, sin [B, T, 1, head_dim].

    Computed per step from positions instead of a cached table: no buffer to materialize after
    meta-device init, and positions may reset at every document start."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    freqs = position_ids[..., None].float() * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q, k, cos, sin):
    """q [B, T, H, D], k [B, T, KV, D]."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
