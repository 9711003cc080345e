"""The memory planner's and the MFU's arithmetic, against hand computations and the model itself."""

import dataclasses

import pytest
import torch

from longctx.base import ConfigError
from longctx.metrics import mfu, peak_flops_for
from longctx.models.common.decoder import Decoder
from longctx.models.qwen2 import qwen2_flavors
from longctx.models.qwen3 import qwen3_flavors
from longctx.planner.memory import (
    GIB,
    Layout,
    attention_backward_per_token,
    block_params,
    largest_term,
    longest_seq,
    plan_memory,
    root_params,
    saved_per_token,
)
from scripts import plan

QWEN3_06B = qwen3_flavors["0.6B"]


@pytest.mark.parametrize("args", [qwen3_flavors["debugmodel"], qwen3_flavors["8B"], qwen2_flavors["2.5-0.5B"]],
                         ids=["qwen3 debug (tied)", "qwen3 8B", "qwen2.5 0.5B (qkv bias)"])
def test_parameter_counts_match_the_built_model(args):
    with torch.device("meta"):
        model = Decoder(args)
    assert sum(p.numel() for p in model.parameters()) == args.num_params()
    block = model.layers["0"]
    assert sum(p.numel() for p in block.parameters()) == block_params(args)
    assert block_params(args) * args.n_layers + root_params(args) == args.num_params()


def test_state_and_activation_terms_by_hand():
    a, seq = QWEN3_06B, 131072
    n = a.num_params()
    terms, host = plan_memory(a, Layout(seq_len=seq, dp_shard=2, cp=2, checkpointing="full"))
    assert terms["fp32 weights"] == 4 * n // 4 and terms["AdamW state"] == 8 * n // 4 and not host
    # 28 block inputs of seq / cp tokens, bf16.
    assert terms["checkpointed activations"] == 28 * (seq // 2) * 1024 * 2
    # Never resharding keeps every block's bf16 copy gathered; otherwise the root and two blocks.
    assert plan_memory(a, Layout(seq_len=seq, reshard_after_forward=False))[0]["gathered bf16 weights"] == 2 * n
    assert terms["gathered bf16 weights"] == 2 * (root_params(a) + 2 * block_params(a))

    offloaded, host = plan_memory(a, Layout(seq_len=seq, dp_shard=2, cp=2, checkpointing="full", cpu_offload=True,
                                            activation_offload=True))
    assert offloaded["fp32 weights"] == offloaded["AdamW state"] == 0
    assert host["fp32 weights"] + host["AdamW state"] + host["fp32 grads"] == 16 * n // 4
    assert host["checkpointed block inputs"] == terms["checkpointed activations"]
    assert offloaded["checkpointed activations"] == (seq // 2) * 1024 * 2  # the one reloaded ahead
    assert offloaded["peak"] < terms["peak"]


def test_tiling_removes_hidden_wide_activations():
    a, seq = QWEN3_06B, 65536
    whole = plan_memory(a, Layout(seq_len=seq, checkpointing="none"))[0]
    tiled = plan_memory(a, Layout(seq_len=seq, checkpointing="none", mlp_chunk=4096))[0]
    # 4 hidden-wide bf16 values per token per block are no longer saved.
    assert whole["checkpointed activations"] - tiled["checkpointed activations"] == 28 * seq * 4 * 3072 * 2


def test_longest_seq_is_the_last_length_that_fits():
    layout = Layout(seq_len=0, checkpointing="full")
    budget = 40 * GIB
    longest = longest_seq(QWEN3_06B, layout, budget, 1e15, 1)
    assert longest % 1024 == 0 and longest > 0
    assert plan_memory(QWEN3_06B, dataclasses.replace(layout, seq_len=longest))[0]["peak"] <= budget
    assert plan_memory(QWEN3_06B, dataclasses.replace(layout, seq_len=longest + 1024))[0]["peak"] > budget


def test_plan_script_reports_fit_the_breaking_term_and_refusals(capsys):
    config = ["--job.config_file", "train_configs/qwen3_bench.toml", "--activation_checkpoint.mode", "full"]
    plan.main(config + ["--training.seq_len", "524288", "--gpu-mem-gib", "20", "--max-seq"])
    out = capsys.readouterr().out
    assert "does not fit" in out and "largest term: checkpointed activations" in out, out
    assert "longest training.seq_len that fits" in out
    with pytest.raises(ConfigError, match="not divisible by dp_replicate"):
        plan.main(config + ["--ngpu", "2", "--parallelism.tensor_parallel_degree", "3"])
    assert largest_term({"a": 1, "b": 3, "peak": 4}) == "b"


def test_flops_per_token_and_mfu_by_hand():
    a, seq = QWEN3_06B, 8192
    dense = 6 * a.num_params(include_embedding=False) + 6 * 1024 * 151936
    assert a.flops_per_token(seq) == dense + 12 * 28 * 16 * 128 * seq
    assert a.flops_per_token(seq, causal=True) == dense + 6 * 28 * 16 * 128 * seq
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for("NVIDIA H100 NVL") == 835e12
    assert peak_flops_for("NVIDIA H200") == 989.4e12
    assert peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for("NVIDIA B200") == 2250e12
    assert peak_flops_for("Tesla T4") == 0.0
    # 50K tokens/s at 4.32 GFLOP/token on an H100 SXM: 0.218.
    assert mfu(50_000, a.flops_per_token(seq), 989.4e12) == pytest.approx(50_000 * a.flops_per_token(seq) / 989.4e12)
    assert mfu(50_000, a.flops_per_token(seq), 0.0) == 0.0


def test_end_of_backward_holds_every_gradient():
    # 4B at 16K under full AC: the peak is block 0's backward, with every fp32 gradient already
    # reduced, one block input left and the root's bf16 gradient awaiting its reduce-scatter.
    a = qwen3_flavors["4B"]
    t = plan_memory(a, Layout(seq_len=16384, checkpointing="full"))[0]
    state = t["fp32 weights"] + t["AdamW state"] + t["fp32 grads"]
    end = (state + t["gathered bf16 weights"] + t["communication buffers"] + t["one block's backward"]
           + 16384 * a.dim * 2 + t["RoPE tables"] + 2 * root_params(a) + t["fixed overhead"])
    assert t["peak"] == end


def test_block_backward_peaks_in_its_larger_phase():
    # cuDNN's backward per token, measured (benchmarks/probe_attention.py --memory, one H100, torch
    # 2.11, the same at 131K, 262K, 524K and 1M): 28,736 bytes for 16 query / 8 kv heads of 128,
    # 53,376 for 32 / 8, 24,640 for 16 / 16. That is dout and dq (bf16), dk and dv, the fp32 dq
    # accumulator, 4 bytes per query head and, under GQA, dk and dv expanded to the query heads.
    a = QWEN3_06B
    assert attention_backward_per_token(a, Layout(seq_len=1)) == 28736 == (
        2048 * 2 * 2 + 2 * 1024 * 2 + 2048 * 4 + 16 * 4 + 2 * 2048 * 2)
    assert attention_backward_per_token(dataclasses.replace(a, n_heads=32), Layout(seq_len=1)) == 53376
    assert attention_backward_per_token(dataclasses.replace(a, n_kv_heads=16), Layout(seq_len=1)) == 24640
    # Ulysses 2 splits the 8 kv heads for twice the tokens; a sequence shard of 2 holds the whole
    # row's K/V (and expands it for its 16 query heads); Ulysses 16 replicates them (one kv head
    # per rank for its one query head, for 16x the tokens: nothing to expand).
    assert attention_backward_per_token(a, Layout(seq_len=1, cp=2)) == 28736
    assert attention_backward_per_token(a, Layout(seq_len=1, cp=2, cp_shard=2)) == 28736 + 2 * 1024 * 2 + 2 * 2048 * 2
    assert attention_backward_per_token(a, Layout(seq_len=1, cp=16)) == 2048 * 8 + 16 * 4 + 2 * 16 * 128 * 2

    seq = 262144
    # 1.7B, whole MLP: its recomputed [T, hidden] values (4 x 6144 bf16 per token, 49,152 bytes)
    # outweigh the attention phase (28,736: the same heads as 0.6B).
    big = qwen3_flavors["1.7B"]
    attention_saved, mlp_saved = saved_per_token(big, Layout(seq_len=seq))
    whole = plan_memory(big, Layout(seq_len=seq, checkpointing="full"))[0]["one block's backward"]
    assert mlp_saved == 4 * 6144 and whole == int(seq * (attention_saved + mlp_saved) * 2 + seq * 3 * big.dim * 2)
    # 0.6B: even its whole MLP (4 x 3072 bf16 per token) is smaller than the attention phase, and
    # tiled its values are smaller still: the attention kernel's phase sets the block's peak.
    in_flight = seq * 3 * a.dim * 2
    attention_saved = saved_per_token(a, Layout(seq_len=seq))[0]
    attention_phase = int(seq * attention_saved * 2 + in_flight + seq * 28736)
    assert plan_memory(a, Layout(seq_len=seq, checkpointing="full"))[0]["one block's backward"] == attention_phase
    tiled = plan_memory(a, Layout(seq_len=seq, checkpointing="full", mlp_chunk=16384))[0]["one block's backward"]
    assert saved_per_token(a, Layout(seq_len=seq, mlp_chunk=16384))[1] == 0
    assert tiled == attention_phase


def test_attention_in_kv_head_groups_holds_one_groups_working_memory():
    """probe_attention --memory --groups 1 8 on an H200 (16/8 heads): 28,736 bytes per token of
    backward working memory at once, 12,224 in 8 groups; the plan keeps the outputs whole (14,344:
    on the safe side) and adds the forward's second copy of the output to what each block keeps."""
    a = QWEN3_06B
    assert attention_backward_per_token(a, Layout(seq_len=1, attention_groups=8)) == 8192 + 4096 + (8192 + 64 + 8192) / 8
    assert attention_backward_per_token(a, Layout(seq_len=1, attention_groups=3)) == 28736  # gcd(3, 8) = 1
    long = Layout(seq_len=1 << 20, checkpointing="full", activation_offload=True, mlp_chunk=16384)
    whole, grouped = plan_memory(a, long)[0], plan_memory(a, dataclasses.replace(long, attention_groups=8))[0]
    assert grouped["one block's backward"] < whole["one block's backward"] and grouped["peak"] < whole["peak"]
    op = Layout(seq_len=65536, checkpointing="op")
    assert (plan_memory(a, dataclasses.replace(op, attention_groups=8))[0]["checkpointed activations"]
            - plan_memory(a, op)[0]["checkpointed activations"]) == 28 * 65536 * 2048 * 2
