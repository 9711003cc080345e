"""Work balance of the global batch (data/balance.py, StepLoader.arrange): the cost model is the
model's own flop count; dealing evens out the ranks' work on long-tail data; whole documents are
re-packed within each row's capacity; the global batch keeps its documents, resumes exactly and
a tokenized rank still reads only its rows; training matches the unbalanced run, loss and gradients."""

import json
import math
import random
from collections import Counter

import pytest
import torch

from longctx.base import IGNORE_INDEX, pack_greedy
from longctx.config import parse_config
from longctx.data.balance import DocumentCost, deal, microbatch_loads, partition_equal, repack, synced_cost
from longctx.data.loader import RowLength, RowSchedule, StepLoader
from longctx.data.packing import PackedStream
from longctx.data.token_shards import TokenCorpus
from longctx.modeling import model_spec_and_args
from longctx.models import get_model_spec
from longctx.recipes import build_recipe
from tests.distributed_harness import run_on_ranks
from tests.test_data import SEQ_LEN, corpus, streams, token_dir  # noqa: F401 (fixtures)
from tests.test_parallel import assert_matches_reference, differences, order_variant, overrides, train_layouts

QWEN3_06B = get_model_spec("qwen3").args_for("0.6B")
COST = DocumentCost.from_flops_per_token(QWEN3_06B.flops_per_token)


def long_tail_rows(count: int, capacity: int = 65536, seed: int = 0) -> list[tuple[int, ...]]:
    """Piece lengths of `count` rows of log-normal documents (256 to 64K tokens, median 4K) packed
    in order and split at row ends, as pretraining packs them."""
    rng, rows, pieces, used = random.Random(seed), [], [], 0
    while len(rows) < count:
        length = min(max(int(rng.lognormvariate(math.log(4096), 1.5)), 256), 65536)
        while length and len(rows) < count:
            piece = min(length, capacity - used)
            pieces.append(piece)
            used, length = used + piece, length - piece
            if used == capacity:
                rows.append(tuple(pieces))
                pieces, used = [], 0
    return rows


def test_cost_is_the_models_causal_flops():
    for length in (1, 1000, 65536):
        assert COST(length) == length * QWEN3_06B.flops_per_token(length, causal=True)
    # A row's padding attends to itself like one more document (packing.packed_row).
    assert COST.row((100, 28), 160) == COST(100) + COST(28) + COST(32)
    assert COST.row((64,), 64) == COST(64)


def test_partition_equal_is_exact_and_even():
    costs = [10, 9, 8, 7, 6, 5, 4, 3]
    parts = partition_equal(costs, 2)
    assert sorted(i for part in parts for i in part) == list(range(8)) and [len(p) for p in parts] == [4, 4]
    assert [sum(costs[i] for i in part) for part in parts] == [26, 26]
    long_tail = [COST.row(row, 65536) for row in long_tail_rows(64)]
    loads = [sum(long_tail[i] for i in part) for part in partition_equal(long_tail, 8)]
    assert max(loads) / (sum(loads) / 8) < 1.01


@pytest.mark.parametrize("grad_accum,local_batch,most", [(1, 4, 1.05), (4, 1, 1.25), (2, 2, 1.15), (1, 8, 1.01)])
def test_dealing_evens_out_long_tail_work(grad_accum, local_batch, most):
    """dp 8, 64K rows of log-normal documents: the synced step (slowest rank at every micro-batch)
    against the mean rank's work, dealt by position and by cost, over 20 global batches."""
    dp = 8
    rows = dp * grad_accum * local_batch
    by_position, balanced, rank_totals = [], [], []
    for seed in range(20):
        costs = [COST.row(row, 65536) for row in long_tail_rows(rows, seed=seed)]
        mean = sum(costs) / dp
        order = deal(costs, dp, grad_accum, local_batch)
        assert sorted(order) == list(range(rows))
        dealt = [costs[i] for i in order]
        by_position.append(synced_cost(costs, dp, local_batch) / mean)
        balanced.append(synced_cost(dealt, dp, local_batch) / mean)
        rank_totals.append(max(map(sum, zip(*microbatch_loads(dealt, dp, local_batch)))) / mean)
    assert sum(balanced) / 20 < most < sum(by_position) / 20, (balanced, by_position)
    assert max(rank_totals) <= max(balanced) + 1e-9  # no rank's total exceeds the synced step


def test_deal_depends_on_the_costs_alone():
    costs = [COST.row(row, 65536) for row in long_tail_rows(32, seed=3)]
    assert deal(costs, 4, 2, 4) == deal(list(costs), 4, 2, 4)
    assert deal(costs, 4, 2, 4) != list(range(32))


def test_repack_evens_out_whole_documents_within_capacity():
    """Log-normal documents (256 to 16K tokens) in as many 64K rows as packing them in order takes:
    every document once, no row over capacity, the most loaded row near the mean."""
    for seed in range(5):
        rng = random.Random(seed)
        lengths = [min(max(int(rng.lognormvariate(math.log(2048), 1.2)), 256), 16384) for _ in range(300)]
        in_order = pack_greedy(lengths, 65536)
        groups = repack(lengths, len(in_order), 65536, COST)
        assert sorted(i for group in groups for i in group) == list(range(300))
        assert all(sum(lengths[i] for i in group) <= 65536 for group in groups)
        work = [[sum(COST(lengths[i]) for i in group) for group in rows] for rows in (in_order, groups)]
        mean = sum(work[0]) / len(in_order)
        assert max(work[1]) / mean < 1.02 < max(work[0]) / mean, seed
    assert repack([3, 3, 3], 2, 4, COST) is None  # three documents of 3 never share a row of 4


# ---------------------------------------------------------------- the loader on real streams


PAD = -1  # no token of these streams: a row's padding is the segment of PAD tokens


def whole_documents(seed: int = 0, count: int = 400) -> PackedStream:
    """An SFT-like stream of long-tail documents (8 to 96 tokens), never split; every token of
    document i is i, so a row's documents can be read back from its tensors."""
    rng = random.Random(seed)
    documents = [(i, min(max(int(rng.lognormvariate(math.log(20), 0.9)), 8), 96)) for i in range(count)]
    return PackedStream(documents, lambda d: ([d[0]] * d[1], [d[0]] * (d[1] - 1) + [IGNORE_INDEX]), pad_id=PAD,
                        split_documents=False)


def documents_of(row: dict) -> list[tuple[int, ...]]:
    """The tokens of each document (or piece) of a row, its padding left out."""
    ids, tokens = row["document_ids"], row["input_ids"]
    return [tuple(tokens[ids == d].tolist()) for d in ids.unique().tolist() if tokens[ids == d][0] != PAD]


def step_rows(loaders: list[StepLoader], step: int) -> list[dict]:
    """One step's global batch as the dp ranks hold it, in position order: micro-batch m of rank r
    holds positions [(m*dp + r)*b, (m*dp + r + 1)*b)."""
    dp, rows = len(loaders), {}
    for rank, loader in enumerate(loaders):
        for m, mb in enumerate(loader.next_step(step).microbatches):
            b = mb["input_ids"].size(0)
            rows.update({(m * dp + rank) * b + i: {k: v[i] for k, v in mb.items()} for i in range(b)})
    return [rows[position] for position in sorted(rows)]


MAKERS = {"raw": lambda made: made["raw"], "tokens": lambda made: made["tokens"], "whole": lambda made: whole_documents}


@pytest.mark.parametrize("kind", list(MAKERS))
def test_balanced_batch_holds_the_same_documents_under_every_layout(kind, streams):  # noqa: F811
    """The union of every rank's rows is the stream's global batch (whole documents: the same
    documents, re-packed within row.tokens), and balancing did move rows in these steps."""
    make, global_batch, schedule = MAKERS[kind](streams), 8, RowSchedule.constant(SEQ_LEN, 4)
    row = schedule.at(1)
    reference = make()
    want = [[reference.build_row(plan, row) for plan in reference.plan_rows(global_batch, row)] for _ in range(3)]
    moved = 0
    for dp, b in [(1, 1), (2, 2), (4, 1)]:
        loaders = [StepLoader(make(), schedule, b, global_batch, dp, rank, balance=COST) for rank in range(dp)]
        for step in range(3):
            got = step_rows(loaders, step + 1)
            where = f"{kind} dp={dp} b={b} step {step + 1}"
            assert Counter(d for r in got for d in documents_of(r)) == Counter(d for r in want[step] for d in documents_of(r)), where
            assert all(int((r["input_ids"] != PAD).sum()) <= row.tokens for r in got), where
            moved += [r["input_ids"].tolist() for r in got] != [r["input_ids"].tolist() for r in want[step]]
        for loader in loaders:
            loader.close()
    assert moved, f"{kind}: no step was rearranged; the test data would not show a balance bug"


def test_tokenized_plans_equal_on_the_fly_plans(streams):  # noqa: F811
    """Both paths see the same pieces (so balance alike), over three epochs and a change of row
    length; a plan's pieces are its row's segments."""
    raw, tokens = streams["raw"](), streams["tokens"]()
    for row in [RowLength(SEQ_LEN, SEQ_LEN + 4)] * 40 + [RowLength(SEQ_LEN // 2, SEQ_LEN // 2)] * 40:
        [want], [got] = raw.plan_rows(1, row), tokens.plan_rows(1, row)
        assert got.lengths == want.lengths and sum(got.lengths) == row.tokens
        ids = tokens.build_row(got, row)["document_ids"]
        assert tuple(torch.bincount(ids).tolist()) == got.lengths + ((row.padded - row.tokens,) if row.padded > row.tokens else ())


def test_rows_of_equal_cost_keep_the_stream_order():
    """Balancing never rearranges what it cannot make faster, as modelled."""
    schedule = RowSchedule.constant(48, 1)
    make = lambda: PackedStream([(i, 16) for i in range(50)], lambda d: ([d[0]] * d[1], [d[0]] * d[1]), PAD)  # noqa: E731
    plans = make().plan_rows(8, schedule.at(1))
    assert StepLoader(make(), schedule, 1, 8, 2, 0, balance=COST).arrange(plans, schedule.at(1)) is plans


@pytest.mark.parametrize("kind", list(MAKERS))
def test_balanced_loader_resumes_exactly(kind, streams):  # noqa: F811
    """A balanced dp2 loader's state after 3 steps (its thread built more), through JSON, resumes
    a dp4 loader at step 4 exactly where an uninterrupted dp4 loader is."""
    make, schedule = MAKERS[kind](streams), RowSchedule(((0, SEQ_LEN), (5, SEQ_LEN // 2)), multiple=4)
    first = StepLoader(make(), schedule, 2, 8, 2, 0, balance=COST)
    for step in range(1, 4):
        first.next_step(step)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    straight = [StepLoader(make(), schedule, 1, 8, 4, rank, balance=COST) for rank in range(4)]
    resumed = [StepLoader(make(), schedule, 1, 8, 4, rank, balance=COST) for rank in range(4)]
    for step in range(1, 4):
        step_rows(straight, step)
    for loader in resumed:
        loader.load_state_dict(state)
    for step in range(4, 7):
        for got, want in zip(step_rows(resumed, step), step_rows(straight, step)):
            assert all(torch.equal(got[k], want[k]) for k in want), f"{kind} step {step}"
    for loader in straight + resumed:
        loader.close()


def test_a_tokenized_rank_reads_only_its_rows(streams, monkeypatch):  # noqa: F811
    """Costs come from the document index; tokens are read (TokenCorpus.span) for a rank's own rows
    only, and the ranks together read every row of the step once."""
    schedule, global_batch, dp = RowSchedule.constant(SEQ_LEN, 1), 8, 2
    reads = []
    span = TokenCorpus.span
    monkeypatch.setattr(TokenCorpus, "span", lambda self, start, length: reads.append(start) or span(self, start, length))
    loaders = [StepLoader(streams["tokens"](), schedule, 1, global_batch, dp, rank, balance=COST) for rank in range(dp)]
    moved = 0
    for step in range(1, 4):
        rows = [((step - 1) * global_batch + i) * SEQ_LEN for i in range(global_batch)]  # the step's row starts
        starts = []
        for loader in loaders:
            reads.clear()
            loader.build_step(step)  # no thread: the reads of this rank's step alone
            assert len(reads) == global_batch // dp
            starts += reads
        assert sorted(starts) == rows
        moved += starts != [rows[i] for rank in range(dp) for i in loaders[rank].owned_rows()]
    assert moved, "no step was rearranged"


# ---------------------------------------------------------------- training parity


# Rows of 256 hold 2 to 3 of the debug conversations: enough to re-pack.
SFT = ["--recipe.name", "sft", "--training.dataset_path", "assets/debug/sft.jsonl", "--training.seq_len", "256"]
STEPS = ["--training.steps", "2"]
BALANCED, UNBALANCED = ["--training.balance", "flops", *STEPS], ["--training.balance", "none", *STEPS]
RECIPES = {"pretrain": [], "sft": SFT}


def rearranged_steps(case: list[str], dp: int, steps: int = 2) -> int:
    """How many of the run's first steps StepLoader.arrange changes, on this process: a parity
    test whose batches never moved would pass without balancing."""
    job_config = parse_config(case)
    _, model_args = model_spec_and_args(job_config)
    training = job_config.training
    stream = build_recipe(job_config).build_stream()
    loader = StepLoader(stream, RowSchedule.constant(training.seq_len, 1), training.local_batch_size,
                        training.global_batch_size, dp, 0, balance=DocumentCost.from_flops_per_token(model_args.flops_per_token))
    row = loader.schedule.at(1)
    plans = [stream.plan_rows(training.global_batch_size, row) for _ in range(steps)]
    return sum(loader.arrange(step, row) is not step for step in plans)


@pytest.fixture(scope="module")
def references(hf_dir, tmp_path_factory):
    """One process, rows in stream order, each with its rounding floor; and SFT balanced on one
    process over micro-batches of one row (whole documents re-pack; on one rank the order of rows
    alone changes nothing of a step's time, so pretraining would not move)."""
    dump = tmp_path_factory.mktemp("balance_ref")
    cases = [overrides(hf_dir, str(dump / name), {}, flags + UNBALANCED) for name, flags in RECIPES.items()]
    sft_balanced = overrides(hf_dir, str(dump / "sft_balanced"), {"local_batch": 1}, SFT + BALANCED)
    assert rearranged_steps(sft_balanced, dp=1) > 0
    # one_process_references' runs and the balanced one in one process group (one start-up)
    *runs, balanced = run_on_ranks(1, train_layouts, [c for case in cases for c in (case, order_variant(case))] + [sft_balanced])
    refs = {name: ref | {"floor": differences(variant, ref)} for name, ref, variant in zip(RECIPES, runs[::2], runs[1::2])}
    return refs, balanced


@pytest.mark.slow
def test_training_matches_the_unbalanced_run(hf_dir, references, tmp_path):
    """Loss, grad norm, weights and gradients of 2 steps: balanced on one process (SFT) and on dp2
    x cp2 (4 gloo ranks, pretraining and SFT) against one process in stream order."""
    refs, sft_one_process = references
    assert_matches_reference(sft_one_process, refs["sft"], "sft balanced, one process")
    cases = [overrides(hf_dir, str(tmp_path / name), {"dp_shard": 2, "cp": 2, "local_batch": 1}, flags + BALANCED)
             for name, flags in RECIPES.items()]
    for case in cases:
        assert rearranged_steps(case, dp=2) > 0, case
    for name, result in zip(RECIPES, run_on_ranks(4, train_layouts, cases)):
        assert_matches_reference(result, refs[name], f"{name} balanced, dp2 x cp2")
