"""Shared test setup: tiny random Hugging Face Qwen models on disk, and the relative-error assertion
every parity test uses."""

import os
from dataclasses import dataclass

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small vocab (odd on purpose: no accidental divisibility), 2 layers: enough to catch a wrong
# mapping between layers, fast enough to build dozens of models.
TINY_HF_CONFIG = dict(
    vocab_size=97,
    num_hidden_layers=2,
    intermediate_size=64,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


@dataclass(frozen=True)
class TinyHF:
    family: str  # HF model_type: "qwen2" or "qwen3"
    path: str  # folder written by save_pretrained
    model: torch.nn.Module  # the transformers model, eval mode, fp32


def randomize_parameters(model: torch.nn.Module, seed: int) -> None:
    """HF and our init set norms to 1 and biases to 0: a wrong mapping of either would go unseen.
    Give every parameter distinct random values instead (names ending in norm.weight/bias are
    spelled the same way in HF's and our modules)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.05 * noise)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref||, in float64."""
    diff = ours.detach().double() - ref.detach().double()
    return (diff.norm() / ref.detach().double().norm().clamp(min=1e-30)).item()


def assert_rel_close(ours: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    """relative_error(ours, ref) <= tol, reporting max and mean absolute difference on failure."""
    rel = relative_error(ours, ref)
    if rel > tol:
        diff = (ours.detach().double() - ref.detach().double()).abs()
        raise AssertionError(f"{what}: relative error {rel:.3e} > {tol:.0e} "
                             f"(max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e})")


@pytest.fixture(scope="session")
def make_tiny_hf(tmp_path_factory):
    """make_tiny_hf(family, hidden_size=..., num_attention_heads=..., num_key_value_heads=...,
    tie_word_embeddings=..., [head_dim=...]) -> TinyHF, built once per distinct shape per session."""
    import transformers  # a test dependency (pyproject [test]); missing it is an error, not a skip
    cache: dict[tuple, TinyHF] = {}

    def make(family: str, seed: int = 0, **shape) -> TinyHF:
        key = (family, seed, repr(sorted(shape.items())))  # repr: a rope_parameters dict is unhashable
        if key not in cache:
            config_cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
            config = config_cls(**(TINY_HF_CONFIG | shape))
            torch.manual_seed(seed)
            model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
            randomize_parameters(model, seed)
            path = str(tmp_path_factory.mktemp(f"hf_{family}"))
            model.save_pretrained(path)
            cache[key] = TinyHF(family, path, model)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def hf_dir(make_tiny_hf):
    """The tiny random Qwen3 that training-level tests start from (4 query heads, 2 kv heads, so
    cp4 replicates kv heads; every parameter random, norms included); its vocab holds the debug
    tokenizer's 500 tokens."""
    return make_tiny_hf("qwen3", vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, tie_word_embeddings=True).path
