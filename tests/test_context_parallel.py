"""Context parallelism = Ulysses x sequence shard: the head-tail order balances causal work, the
per-rank attention of every shard equals whole-row attention, and every cp layout trains exactly
as one process (loss and grad norm of every step, final weights; fp32, within
tests/test_parallel.py's tolerance).

The parity layouts cover each shape of the cp split: pure sequence sharding (6 query / 2 kv heads
at cp 3: no Ulysses degree fits both), Ulysses x shard (cp 4 = 2 x 2, under HSDP, with tp and
per-op checkpointing), and a deep shard (cp 8 = Ulysses 2 x shard 4), all on packed multi-document rows
(train.py's pretrain recipe packs the debug corpus)."""

import pytest
import torch

from longctx.config import parse_config
from longctx.launch import validate
from longctx.models.common.attention import build_attention_mask, chunked_attention
from longctx.parallelisms.context_parallel import cp_token_order, shard_chunks, slice_for_cp, unshard_row
from tests.conftest import assert_rel_close
from tests.distributed_harness import run_on_ranks
from tests.test_parallel import assert_matches_reference, one_process_references, overrides, train_layouts

ULYSSES_2 = ["--parallelism.context_parallel_ulysses_degree", "2"]


def causal_work(document_ids: torch.Tensor | None, seq: int, shard: int) -> list[int]:
    """Attention flops of each shard rank, counted as the True entries of its chunks' masks."""
    work = []
    for rank in range(shard):
        chunks = shard_chunks(seq, shard, rank)
        for chunk in build_attention_mask(document_ids, chunks, torch.device("cpu")):
            if chunk.mask is None:  # plain causal square
                chunk = chunk._replace(mask=torch.ones(chunk.length, chunk.length, dtype=torch.bool).tril())
            work.append((rank, int(chunk.mask.sum())))
    return [sum(w for r, w in work if r == rank) for rank in range(shard)]


@pytest.mark.parametrize("shard", [2, 4, 8])
def test_head_tail_chunks_balance_causal_work(shard):
    seq = 2 * shard * 64
    work = causal_work(None, seq, shard)
    assert max(work) <= 1.1 * min(work), f"per-rank causal work {work}"
    assert sum(work) == seq * (seq + 1) // 2  # every (query, key) pair once
    # Contiguous chunks, for contrast: the last rank does (2*shard - 1) times the first's work.
    contiguous = [(c + 1) * (seq // shard) ** 2 - (seq // shard) * (seq // shard - 1) // 2 for c in range(shard)]
    assert max(contiguous) > 2 * min(contiguous)


def test_token_order_round_trips():
    seq, cp, shard = 48, 6, 3
    order = cp_token_order(seq, cp, shard)
    assert sorted(order.tolist()) == list(range(seq))
    row = torch.arange(seq).float()[None]
    pieces = [slice_for_cp(row, rank, cp, shard)[0] for rank in range(cp)]
    assert torch.equal(unshard_row(pieces, shard), row[0])
    # shard rank 1 of 3 holds chunks 1 and 4 of 6, split over its 2 Ulysses ranks (cp ranks 2 and 3)
    assert torch.cat(pieces[2:4]).tolist() == list(range(8, 16)) + list(range(32, 40))


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "document-masked"])
@pytest.mark.parametrize("shard", [2, 3])
def test_shard_attention_equals_whole_row(packed, shard):
    """Each shard rank's computation (its two query chunks against the whole row's K/V), simulated
    in one process, reproduces whole-row attention forward and backward. GPU kernels:
    tests/test_gpu_context_parallel.py."""
    torch.manual_seed(0)
    bsz, seq = 2, 48
    q, k, v = torch.randn(bsz, seq, 6, 8), torch.randn(bsz, seq, 2, 8), torch.randn(bsz, seq, 2, 8)
    doc_ids = torch.tensor([[0] * 13 + [1] * 20 + [2] * 15, [0] * 30 + [1] * 18]) if packed else None
    grad_out = torch.randn(bsz, seq, 6, 8)

    def run(chunks_of_ranks):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        outs = []
        for chunks in chunks_of_ranks:
            index = torch.cat([torch.arange(start, start + length) for start, length in chunks])
            out = chunked_attention(leaves[0][:, index], leaves[1], leaves[2], build_attention_mask(doc_ids, chunks, q.device))
            outs.append((index, out))
        full = torch.empty_like(grad_out)
        for index, out in outs:
            full[:, index] = out
        (full * grad_out).sum().backward()
        return full, [t.grad for t in leaves]

    ref_out, ref_grads = run([[(0, seq)]])
    out, grads = run([shard_chunks(seq, shard, rank) for rank in range(shard)])
    assert_rel_close(out, ref_out, 1e-6, "output")
    for name, g, want in zip("qkv", grads, ref_grads):
        assert_rel_close(g, want, 1e-6, f"grad {name}")


# ---------------------------------------------------------------- parity with one process


def six_heads(make_tiny_hf) -> str:
    """6 query / 2 kv heads: Ulysses alone cannot run cp 3 or cp 4 on it."""
    return make_tiny_hf("qwen3", vocab_size=512, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                        head_dim=16, tie_word_embeddings=True).path


@pytest.fixture(scope="module")
def references(make_tiny_hf, tmp_path_factory):
    """One process: the 6-head model and the debug flavor (seeded random init)."""
    dump = tmp_path_factory.mktemp("ref")
    cases = [overrides(six_heads(make_tiny_hf), str(dump / "six"), {}),
             overrides(None, str(dump / "debug"), {"random_init": True})]
    six, debug = one_process_references(cases)
    return {"six": six, "debug": debug}


OP_AC = ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"]

# name: (model, layout, (ulysses, shard) the split must come out as). cp 4 alone runs inside each
# replica of the HSDP case; dp_shard x a sequence shard, compiled with full checkpointing, is
# tests/test_parallel.py's 8-rank case.
LAYOUTS = {
    3: {"cp3 = shard 3": ("six", {"cp": 3}, (1, 3))},
    8: {"HSDP: dp_replicate2 x cp4 (ulysses 2 x shard 2)": ("six", {"dp_replicate": 2, "cp": 4}, (2, 2)),
        "debug tp2 x cp4 (ulysses 2 x shard 2), per-op AC": (
            "debug", {"tp": 2, "cp": 4, "random_init": True, "flags": ULYSSES_2 + OP_AC}, (2, 2)),
        "debug cp8 (ulysses 2 x shard 4)": ("debug", {"cp": 8, "random_init": True, "flags": ULYSSES_2}, (2, 4))},
}


@pytest.mark.parametrize("world_size", sorted(LAYOUTS))
def test_cp_layouts_match_one_process(world_size, make_tiny_hf, references, tmp_path, monkeypatch):
    names = list(LAYOUTS[world_size])
    six = six_heads(make_tiny_hf)
    cases = [overrides(six if model == "six" else None, str(tmp_path / str(i)), layout)
             for i, (model, layout, _) in enumerate(LAYOUTS[world_size].values())]
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    for case, (_, _, split) in zip(cases, LAYOUTS[world_size].values()):
        dims = validate(parse_config(case)).parallel_dims  # the automatic split, or the one asked for
        assert (dims.cp_ulysses, dims.cp_shard) == split
    for name, result in zip(names, run_on_ranks(world_size, train_layouts, cases)):
        model = LAYOUTS[world_size][name][0]
        # The debug flavor sums more fp32 terms in another order: ~2e-5 (tests/test_parallel.py).
        assert_matches_reference(result, references[model], name, rtol=1e-5 if model == "six" else 1e-4)
        for proj in ("wq", "wk", "wv"):
            assert result["grads"][f"layers.0.attention.{proj}.weight"].abs().max() > 0, f"{name}: zero gradient on {proj}"
