"""Qwen2 / Qwen2.5 dense models: the shared decoder with q/k/v bias and no q/k norm.
Qwen2.5 is a size table over Qwen2 (same architecture)."""

from longctx.models.common.args import DecoderArgs
from longctx.models.common.spec import ModelSpec
from longctx.models.qwen2.parallelize import parallelize_qwen2
from longctx.models.qwen2.state_dict_adapter import Qwen2StateDictAdapter

QWEN2_FLAGS = dict(qkv_bias=True, qk_norm=False)
_SMALL = dict(vocab_size=151936, rope_theta=1_000_000.0, max_seq_len=32768, tie_embeddings=True, **QWEN2_FLAGS)
_LARGE = dict(vocab_size=152064, rope_theta=1_000_000.0, max_seq_len=32768, **QWEN2_FLAGS)

qwen2_flavors = {
    # dims: https://huggingface.co/Qwen/Qwen2.5-*/blob/main/config.json
    "debugmodel": DecoderArgs(vocab_size=2048, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, hidden_dim=768,
                              max_seq_len=4096, rope_theta=10000.0, tie_embeddings=True, **QWEN2_FLAGS),
    "2.5-0.5B": DecoderArgs(dim=896, n_layers=24, n_heads=14, n_kv_heads=2, hidden_dim=4864, **_SMALL),
    "2.5-1.5B": DecoderArgs(dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, hidden_dim=8960, **_SMALL),
    "2.5-3B": DecoderArgs(dim=2048, n_layers=36, n_heads=16, n_kv_heads=2, hidden_dim=11008, **_SMALL),
    "2.5-7B": DecoderArgs(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, hidden_dim=18944, norm_eps=1e-6, **_LARGE),
    "2.5-14B": DecoderArgs(dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, hidden_dim=13824, norm_eps=1e-5, **_LARGE),
    "2.5-32B": DecoderArgs(dim=5120, n_layers=64, n_heads=40, n_kv_heads=8, hidden_dim=27648, norm_eps=1e-5, **_LARGE),
    "2.5-72B": DecoderArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=29568, norm_eps=1e-5, **_LARGE),
}

QWEN2 = ModelSpec("qwen2", "Qwen2ForCausalLM", qwen2_flavors, QWEN2_FLAGS, parallelize_qwen2, Qwen2StateDictAdapter)
