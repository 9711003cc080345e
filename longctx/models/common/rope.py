"""Rotary position embedding (Su et al. 2021, arXiv:2104.09864), in Hugging Face's rotate-half layout
so that checkpoints exchange without permuting q/k weights, with the context-extension scalings
Qwen configs use: linear position interpolation (Chen et al. 2023, arXiv:2306.15595) and YaRN
(Peng et al. 2023, arXiv:2309.00071). Frequencies and YaRN's attention factor follow transformers'
`modeling_rope_utils._compute_linear_scaling_rope_parameters` / `_compute_yarn_parameters` (5.x)
number for number, so logits match HF at every position."""

import math
from dataclasses import asdict, dataclass

import torch

from longctx.base import ConfigError

# config.json keys each type may carry (transformers' _validate_<type>_rope_parameters).
_KEYS = {
    "linear": {"factor"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"},
}
_IGNORED = {"type", "rope_type", "rope_theta"}  # the type is the key; rope_theta is DecoderArgs.rope_theta


@dataclass(frozen=True)
class RopeScaling:
    """A config.json `rope_parameters` / `rope_scaling` entry other than "default". Optional YaRN
    fields stay None when the file leaves them out: they are written back exactly as read, and
    resolved to transformers' defaults only where frequencies are computed."""

    rope_type: str  # "linear" or "yarn"
    factor: float
    original_max_position_embeddings: int | None = None  # yarn: the pretraining context length
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None

    def to_hf(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


def rope_scaling_from_dict(entry: dict | None, max_position_embeddings: int) -> RopeScaling | None:
    """config.json's (or the TOML's) rope entry -> RopeScaling, None for plain RoPE. Accepts `type`
    (legacy) or `rope_type`. Raises ConfigError, one line, for a type or key we do not implement."""
    entry = dict(entry or {})
    rope_type = entry.get("rope_type", entry.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type not in _KEYS:
        raise ConfigError(f"rope scaling type {rope_type!r} is not supported; use 'yarn' or 'linear' "
                         "(or 'default' for none); 'dynamic' NTK changes frequencies with the batch's length")
    values = {k: v for k, v in entry.items() if k not in _IGNORED}
    unknown = sorted(set(values) - _KEYS[rope_type])
    if unknown:
        raise ConfigError(f"rope scaling {rope_type!r} has unknown keys {unknown}; valid: {sorted(_KEYS[rope_type])}")
    for key, value in values.items():
        flag = key == "truncate"
        if value is not None and (not isinstance(value, bool if flag else (int, float)) or (not flag and isinstance(value, bool))):
            raise ConfigError(f"rope scaling {key}={value!r} must be {'true/false' if flag else 'a number'}")
    if rope_type == "yarn":
        # transformers: the original length defaults to max_position_embeddings, and a null factor
        # to their ratio (modeling_rope_utils.standardize_rope_params, _compute_yarn_parameters).
        original = values.get("original_max_position_embeddings") or max_position_embeddings
        values["original_max_position_embeddings"] = int(original)
        if values.get("factor") is None:
            values["factor"] = max_position_embeddings / original
    factor = values.get("factor")
    if factor is None or factor < 1:
        raise ConfigError(f"rope scaling {rope_type!r} needs factor >= 1 (the context extension ratio), got {factor!r}")
    values["factor"] = float(factor)
    return RopeScaling(rope_type, **values)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_range(s: RopeScaling, head_dim: int, theta: float) -> tuple[float, float]:
    """The band of rotary dimensions between "rotates beta_fast times" and "beta_slow times" over the
    original context: faster dimensions extrapolate, slower ones interpolate, the band ramps."""
    def dim_of(rotations: float) -> float:
        return head_dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.beta_fast or 32), dim_of(s.beta_slow or 1)  # `or`: a 0 takes the default, as in HF
    if s.truncate is None or s.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, head_dim - 1)


def inv_freq_and_attention_factor(head_dim: int, theta: float, scaling: RopeScaling | None, device=None):
    """-> (inverse frequencies [head_dim/2] fp32, factor that multiplies cos and sin)."""
    base = theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
    if scaling is None:
        return 1.0 / base, 1.0
    if scaling.rope_type == "linear":  # positions / factor, applied to the frequencies instead
        return 1.0 / base / scaling.factor, 1.0
    low, high = _yarn_correction_range(scaling, head_dim, theta)
    high = high + 0.001 if low == high else high  # HF's guard against a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 on the fast dimensions: keep their frequencies
    inv_freq = 1.0 / (scaling.factor * base) * (1 - extrapolation) + 1.0 / base * extrapolation
    attention_factor = scaling.attention_factor
    if attention_factor is None:  # YaRN's sqrt(1/t) = 0.1 ln(s) + 1, or DeepSeek's mscale ratio
        if scaling.mscale and scaling.mscale_all_dim:
            attention_factor = _yarn_mscale(scaling.factor, scaling.mscale) / _yarn_mscale(scaling.factor, scaling.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(scaling.factor)
    return inv_freq, float(attention_factor)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 scaling: RopeScaling | None = None):
    """position_ids [B, T] (per-document, global even under CP) -> cos, sin [B, T, 1, head_dim].

    Computed per step from the positions handed in instead of a cached table: no buffer to
    materialize after meta-device init, positions may restart at every document and may arrive in
    any order (a CP rank's slice), and a position past the pretraining length costs nothing extra.
    YaRN's attention factor scales cos and sin, so q.k scales by its square (as in transformers)."""
    inv_freq, attention_factor = inv_freq_and_attention_factor(head_dim, theta, scaling, position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return (emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q, k, cos, sin):
    """q [B, T, H, D], k [B, T, KV, D]."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
