"""Qwen3 dense models: the shared decoder with per-head q/k RMSNorm and no q/k/v bias."""

from longctx.models.common.args import DecoderArgs
from longctx.models.common.spec import ModelSpec
from longctx.models.qwen3.parallelize import parallelize_qwen3
from longctx.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter

QWEN3_FLAGS = dict(qk_norm=True, qkv_bias=False)
_COMMON = dict(vocab_size=151936, head_dim=128, norm_eps=1e-6, rope_theta=1_000_000.0, max_seq_len=40960, **QWEN3_FLAGS)

qwen3_flavors = {
    # dims: https://huggingface.co/Qwen/Qwen3-*/blob/main/config.json
    "debugmodel": DecoderArgs(vocab_size=2048, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, hidden_dim=768,
                              head_dim=32, max_seq_len=4096, tie_embeddings=True, **QWEN3_FLAGS),
    # A real Qwen3 shape scaled down (GQA 8/4, q/k norm, head_dim 64, 3x MLP, tied) on the debug tokenizer,
    # RoPE base 10K for its 2K pretraining length: train_configs/retrieval_2k.toml.
    "25M": DecoderArgs(vocab_size=512, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, hidden_dim=1536, head_dim=64,
                       rope_theta=10000.0, max_seq_len=2048, tie_embeddings=True, **QWEN3_FLAGS),
    # The same shape at CPU size (2 layers suffice for the induction a retrieval needs), RoPE base 10K
    # for its 256-token pretraining: scripts/context_extension.py --size cpu.
    "0.5M": DecoderArgs(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=384, head_dim=32,
                        rope_theta=10000.0, max_seq_len=256, tie_embeddings=True, **QWEN3_FLAGS),
    "0.6B": DecoderArgs(dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, hidden_dim=3072, tie_embeddings=True, **_COMMON),
    "1.7B": DecoderArgs(dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, hidden_dim=6144, tie_embeddings=True, **_COMMON),
    "4B": DecoderArgs(dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, hidden_dim=9728, tie_embeddings=True, **_COMMON),
    "8B": DecoderArgs(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, hidden_dim=12288, **_COMMON),
    "14B": DecoderArgs(dim=5120, n_layers=40, n_heads=40, n_kv_heads=8, hidden_dim=17408, **_COMMON),
    "32B": DecoderArgs(dim=5120, n_layers=64, n_heads=64, n_kv_heads=8, hidden_dim=25600, **_COMMON),
}

QWEN3 = ModelSpec("qwen3", "Qwen3ForCausalLM", qwen3_flavors, QWEN3_FLAGS, parallelize_qwen3, Qwen3StateDictAdapter)
