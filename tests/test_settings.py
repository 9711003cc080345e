"""How a model is wrapped and run (parallelisms/settings.py): the automatic layout's choice, the
one-rank path without FSDP, attention by kv-head group. Each against what it must equal."""

import dataclasses
import functools
import itertools

import pytest
import torch

from longctx.base import ConfigError
from longctx.config import parse_config
from longctx.launch import auto_candidates, model_settings
from longctx.models.common.attention import attention_kernel, build_attention_mask
from longctx.models.common.decoder import Decoder
from longctx.models.common.loss import chunked_cross_entropy_sum
from longctx.models.qwen3 import QWEN3_FLAGS, qwen3_flavors
from longctx.models.qwen3.parallelize import parallelize_qwen3
from longctx.parallelisms.parallel_dims import ParallelDims
from longctx.parallelisms.settings import ModelSettings, forward_context
from longctx.planner import auto
from longctx.planner.memory import GIB, Layout, layout_for, plan_memory
from tests.conftest import assert_rel_close, randomize_parameters, relative_error
from tests.test_models import pack, tiny_args
from tests.test_recipes import one_rank

QWEN3_06B = qwen3_flavors["0.6B"]
ONE_GPU = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, world_size=1).for_heads(16, 8)


def auto_job(seq_len: int, *flags: str):
    return parse_config(["--job.config_file", "train_configs/qwen3_bench.toml", "--activation_checkpoint.mode", "auto",
                         "--training.seq_len", str(seq_len), *flags])


def chosen(seq_len: int, budget_gib: float, *flags: str) -> ModelSettings:
    return model_settings(auto_job(seq_len, *flags), QWEN3_06B, ONE_GPU, device_type="cuda", budget_bytes=budget_gib * GIB)


def one_gpu_layout(settings: ModelSettings, seq_len: int) -> Layout:
    return layout_for(settings, ONE_GPU, seq_len, batch=1)


def test_auto_recomputes_nothing_when_everything_fits():
    settings = chosen(8192, 70)
    assert settings.checkpointing == ("none",) * 28
    assert (settings.mlp_chunk, settings.activation_offload, settings.attention_groups) == (0, False, 1)
    assert not settings.fsdp, "one GPU: autocast without FSDP's copies is the faster fit"


def test_auto_recomputes_more_as_the_budget_shrinks_and_always_fits_it():
    """Qwen3-0.6B at 64K on one GPU: from no checkpointing to a mix of per-op and none blocks, to
    every block checkpointed with tiles and offload, each choice under its budget."""
    seq, seconds = 65536, []
    for budget in (200, 70, 50, 30, 20):
        settings = chosen(seq, budget)
        layout = one_gpu_layout(settings, seq)
        assert plan_memory(QWEN3_06B, layout)[0]["peak"] <= budget * GIB, (budget, settings.describe())
        seconds.append(auto.step_seconds(QWEN3_06B, layout))
    assert chosen(seq, 200).checkpointing == ("none",) * 28, "200 GiB holds every activation"
    assert seconds == sorted(seconds) and seconds[0] < seconds[-1], f"slower for less memory: {seconds}"
    mixed = chosen(seq, 70).checkpointing
    assert "none" in mixed and "op" in mixed, f"70 GiB at 64K: a mix of per-op and none blocks, got {mixed}"
    tight = chosen(seq, 20)
    assert tight.mlp_chunk or tight.activation_offload or tight.attention_groups > 1, tight.describe()


def test_auto_choice_is_the_fastest_candidate_that_fits():
    job, budget = auto_job(131072), 60 * GIB
    base = model_settings(job, QWEN3_06B, ONE_GPU, device_type="cuda", budget_bytes=budget)
    table = auto_candidates(job, QWEN3_06B, ONE_GPU, base, budget)
    fitting = [c for c in table if c.peak <= budget]
    assert fitting and table[0] == min(fitting, key=lambda c: c.seconds)
    assert all(c.peak > budget for c in table[len(fitting):]), "fits first, then the rest by peak"
    # Brute force over every block mix of every feature set: auto's walk finds each one's fastest.
    for choice in table:
        fastest = None
        for full, op in itertools.product(range(29), range(29)):
            if full + op > 28 or (choice.settings.activation_offload and full + op == 0):
                continue
            layout = one_gpu_layout(dataclasses.replace(choice.settings, checkpointing=auto.block_mix(28, full, op)), 131072)
            if plan_memory(QWEN3_06B, layout)[0]["peak"] <= budget:
                seconds = auto.step_seconds(QWEN3_06B, layout)
                fastest = seconds if fastest is None else min(fastest, seconds)
        assert (fastest is None) == (choice.peak > budget), choice.settings.describe()
        assert fastest is None or choice.seconds == fastest, choice.settings.describe()


def test_auto_cuts_the_loss_chunk_only_to_fit():
    """Qwen3-0.6B at 8K: the configured chunk where memory is plentiful (8192: fewer chunks, faster),
    half of 4096 where that lets every block keep everything."""
    assert chosen(8192, 70, "--recipe.loss_chunk_size", "8192").loss_chunk == 8192
    assert chosen(8192, 70).loss_chunk == 4096
    tight = chosen(8192, 20.5)
    assert (tight.checkpointing, tight.loss_chunk) == (("none",) * 28, 2048), tight.describe()
    assert plan_memory(QWEN3_06B, one_gpu_layout(tight, 8192))[0]["peak"] <= 20.5 * GIB


def test_auto_refuses_what_nothing_fits_naming_the_smallest_plan():
    with pytest.raises(ConfigError, match=r"activation_checkpoint.mode=auto: nothing fits 4.0 GiB at training.seq_len=1048576: "
                                          r"the smallest plan needs [\d.]+ GiB"):
        chosen(1 << 20, 4)


def test_auto_keeps_fsdp_where_the_layout_needs_it():
    two_gpus = ParallelDims(dp_replicate=1, dp_shard=2, cp=1, tp=1, world_size=2).for_heads(16, 8)
    settings = model_settings(auto_job(65536), QWEN3_06B, two_gpus, device_type="cuda", budget_bytes=70 * GIB)
    assert settings.fsdp
    offloaded = chosen(65536, 70, "--training.enable_cpu_offload")
    assert offloaded.fsdp and offloaded.cpu_offload


def test_attention_by_kv_head_group_equals_all_heads_at_once():
    """GQA (8 query heads on 4 kv heads), document-masked query chunks: the same output and gradients
    whatever the number of groups (a number that does not divide the kv heads takes their gcd)."""
    torch.manual_seed(0)
    q = torch.randn(2, 24, 8, 16, requires_grad=True)
    k, v = (torch.randn(2, 24, 4, 16, requires_grad=True) for _ in range(2))
    mask = build_attention_mask(torch.tensor([[0] * 10 + [1] * 14] * 2), [(0, 24)], torch.device("cpu"))[0].mask
    results = []
    for groups in (1, 2, 4, 3):
        out = attention_kernel(q, k, v, mask, kv_groups=groups)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (q, k, v))
        results.append((out, *grads))
    for groups, result in zip((2, 4, 3), results[1:]):
        for name, got, want in zip(("out", "dq", "dk", "dv"), result, results[0]):
            assert_rel_close(got, want, 1e-6, f"{groups} groups: {name}")


def one_rank_model(reference: Decoder, settings: ModelSettings) -> Decoder:
    model = Decoder(reference.args)
    model.load_state_dict(reference.state_dict())
    return parallelize_qwen3(model, ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, world_size=1).for_heads(4, 2),
                             settings)


def loss_and_grads(model: Decoder, settings: ModelSettings, batch) -> tuple[torch.Tensor, dict]:
    tokens, labels, positions, doc_ids = batch
    with forward_context(settings, "cpu"):
        loss = model(tokens, positions, doc_ids, head=functools.partial(chunked_cross_entropy_sum, labels=labels, chunk_size=16))
    loss.backward()
    grads = {name.replace("_checkpoint_wrapped_module.", ""): p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for name, p in model.named_parameters()}
    return loss.detach(), grads


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_one_rank_without_fsdp_equals_fsdp(compiled):
    """The one-rank path (no FSDP, autocast to bf16 over fp32 weights) against FSDP2's mixed
    precision on a mesh of one (bf16 weights), with per-block checkpointing (full, op, none), MLP
    tiles and kv-head groups on: in fp32 the two paths agree to fp32 rounding, and in bf16 the
    autocast path is no further from the fp32 result than FSDP's is (per loss and gradient)."""
    torch.manual_seed(0)
    reference = Decoder(tiny_args(QWEN3_FLAGS, n_layers=3, dim=64, hidden_dim=96, head_dim=16))
    randomize_parameters(reference, seed=1)
    batch = pack([torch.randint(0, 97, (n,)) for n in (20, 30, 14)])
    common = dict(checkpointing=("full", "op", "none"), compile=compiled, mlp_chunk=24, attention_groups=2)
    with one_rank():
        results = {}
        for name, dtype, fsdp in [("fsdp bf16", torch.bfloat16, True), ("autocast bf16", torch.bfloat16, False),
                                  ("fsdp fp32", torch.float32, True), ("plain fp32", torch.float32, False)]:
            settings = ModelSettings(compute_dtype=dtype, fsdp=fsdp, **common)
            loss, grads = loss_and_grads(one_rank_model(reference, settings), settings, batch)
            results[name] = {"loss": loss, **grads}
    exact, fsdp_bf16, autocast_bf16 = results["fsdp fp32"], results["fsdp bf16"], results["autocast bf16"]
    for name, want in exact.items():
        assert_rel_close(results["plain fp32"][name], want, 1e-5, f"plain fp32 vs FSDP fp32: {name}")
        ours, theirs = relative_error(autocast_bf16[name], want), relative_error(fsdp_bf16[name], want)
        assert ours <= max(1.5 * theirs, 5e-3), f"{name}: autocast {ours:.2e} from fp32, FSDP bf16 {theirs:.2e}"
