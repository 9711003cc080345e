"""Decoder hyper-parameters shared by every Qwen family, and their exchange with HF config.json."""

import json
import os
from dataclasses import dataclass

from longctx.base import ConfigError
from longctx.models.common.rope import RopeScaling, rope_scaling_from_dict


@dataclass(frozen=True)
class DecoderArgs:
    """One Qwen decoder. Frozen: a job derives its own copy with `dataclasses.replace`."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int  # SwiGLU inner size (HF intermediate_size)
    head_dim: int | None = None  # None: dim // n_heads (Qwen2); Qwen3 sets it explicitly
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_seq_len: int = 32768
    rope_scaling: RopeScaling | None = None  # YaRN / linear context extension; None: plain RoPE
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE

    def __post_init__(self):
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    def num_params(self, include_embedding: bool = True) -> int:
        d, hd = self.dim, self.head_dim
        attn = d * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        if self.qkv_bias:
            attn += hd * (self.n_heads + 2 * self.n_kv_heads)
        if self.qk_norm:
            attn += 2 * hd
        block = attn + 3 * d * self.hidden_dim + 2 * d
        n = self.n_layers * block + d
        if include_embedding:
            n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return n

    def flops_per_token(self, seq_len: int, causal: bool = False) -> int:
        """Training flops per token (forward + backward = 3 x forward, 2 flops per multiply-add;
        Kaplan et al. 2020 and PaLM's appendix B, arXiv:2204.02311), torchtitan's convention
        (docs/design.md, flops):

            6 * N_nonembedding + 6 * dim * vocab (output projection) + 12 * L * H * head_dim * T

        The attention term counts every query against all T keys (QK^T and PV, 2 x 2 x T x H x
        head_dim per token, times 3): what torchtitan and most papers report. causal=True counts
        only the causal half a masked kernel computes (6 instead of 12), the work actually done.
        Recomputation by activation checkpointing is never counted (MFU, not HFU)."""
        n = self.num_params(include_embedding=False)
        attention = (6 if causal else 12) * self.n_layers * self.n_heads * self.head_dim * seq_len
        return 6 * n + 6 * self.dim * self.vocab_size + attention


# HF config.json <-> DecoderArgs. Flags (qkv_bias, qk_norm) come from the family, not the file.
_HF_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "intermediate_size": "hidden_dim",
    "head_dim": "head_dim",
    "rms_norm_eps": "norm_eps",
    "max_position_embeddings": "max_seq_len",
    "tie_word_embeddings": "tie_embeddings",
}


def read_hf_config(path: str) -> dict:
    """An HF model folder's config.json (or that file itself) as a dict; a ConfigError names the file."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # missing, unreadable or not JSON
        raise ConfigError(f"cannot read {file}: {' '.join(str(e).split())}") from e


def args_from_hf_config(cfg: dict, **family_flags) -> DecoderArgs:
    missing = [k for k in _HF_FIELDS if k not in cfg and k not in ("head_dim", "tie_word_embeddings")]
    if missing:
        raise ConfigError(f"config.json lacks {missing}; is it a Qwen2/Qwen3 causal LM config?")
    # transformers 5.x writes `rope_parameters` (rope_theta inside), older files `rope_scaling` and a
    # top-level rope_theta; with both, transformers takes rope_scaling and the dict's own theta.
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta") or cfg.get("rope_theta")
    kwargs = {ours: cfg[hf] for hf, ours in _HF_FIELDS.items() if cfg.get(hf) is not None}
    kwargs.setdefault("n_kv_heads", cfg["num_attention_heads"])
    scaling = rope_scaling_from_dict(rope, cfg["max_position_embeddings"])
    return DecoderArgs(rope_theta=float(theta or 10000.0), rope_scaling=scaling, **kwargs, **family_flags)


def args_to_hf_config(args: DecoderArgs) -> dict:
    cfg = {hf: getattr(args, ours) for hf, ours in _HF_FIELDS.items()}
    scaling = args.rope_scaling.to_hf() if args.rope_scaling else {"rope_type": "default"}
    cfg.update(hidden_act="silu", rope_theta=args.rope_theta, rope_parameters={"rope_theta": args.rope_theta, **scaling},
               attention_dropout=0.0, initializer_range=0.02, use_cache=True)
    return cfg
