"""The data path: pack_row, StepLoader (row ownership, layout invariance, prefetch, resume) and the
tokenized path (scripts/tokenize_corpus.py's shards read back, rows equal to on-the-fly packing, refusals).
Every reference is one plain stream's rows, one at a time (`next_row`), computed here."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from longctx.base import IGNORE_INDEX, DataError
from longctx.config import parse_config
from longctx.data.loader import RowLength, RowSchedule, StepLoader
from longctx.data.packing import PackedStream, pack_row
from longctx.data.token_shards import METADATA, TokenCorpus
from longctx.data.tokenize_corpus import tokenize_corpus
from longctx.data.tokenizer import document_tokens
from longctx.recipes import build_recipe
from scripts import make_debug_assets
from tests.conftest import ROOT

ASSETS = os.path.join(ROOT, "assets", "debug")
SEQ_LEN = 48  # shorter than most documents: rows split them, and 40 documents wrap within the tests


def job_config(dataset_path: str, *extra: str):
    return parse_config(["--training.dataset_path", dataset_path, "--training.seq_len", str(SEQ_LEN),
                         "--model.hf_assets_path", ASSETS, *extra])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """40 documents of the debug corpus (about 5000 tokens): several epochs within a few steps."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(os.path.join(ASSETS, "corpus.jsonl")) as f:
        path.write_text("".join(f.readlines()[:40]))
    return str(path)


@pytest.fixture(scope="module")
def token_dir(corpus, tmp_path_factory) -> str:
    """The corpus through scripts/tokenize_corpus.py: 2 workers, shards of ~1000 tokens (several)."""
    out = str(tmp_path_factory.mktemp("tokens") / "tokens")
    tokenize_corpus(corpus, out, ASSETS, "auto", "text", workers=2, shard_tokens=1000)
    return out


@pytest.fixture(scope="module")
def streams(corpus, token_dir):
    """kind -> a function making a fresh pretrain stream."""
    raw, tokens = build_recipe(job_config(corpus)), build_recipe(job_config(token_dir))
    return {"raw": raw.build_stream, "tokens": tokens.build_stream}


def next_row(stream, row: RowLength) -> dict:
    """The stream's next row alone: the reference every loader test compares with."""
    return stream.next_rows(1, [0], row)[0]


def assert_rows_equal(got: dict, want: dict, where: str) -> None:
    assert got.keys() == want.keys(), where
    for key in want:
        assert torch.equal(got[key], want[key]), f"{where}: {key} differs\n{got[key]}\n{want[key]}"


def test_pack_row_positions_and_documents():
    row = pack_row([([1, 2, 3], [2, 3, -100]), (np.array([4, 5]), np.array([5, -100]))], 7, pad_id=0)
    assert row["input_ids"].tolist() == [1, 2, 3, 4, 5, 0, 0]
    assert row["labels"].tolist() == [2, 3, -100, 5, -100, -100, -100]
    assert row["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 1]  # padding restarts too
    assert row["document_ids"].tolist() == [0, 0, 0, 1, 1, 2, 2]  # padding is its own document


def test_tokenize_round_trip(corpus, token_dir):
    tokenizer = build_recipe(job_config(corpus)).tokenizer
    with open(corpus) as f:
        documents = [document_tokens(tokenizer, json.loads(line)["text"]) for line in f]
    metadata = json.load(open(os.path.join(token_dir, METADATA)))
    assert len(metadata["shards"]) > 2 and metadata["dtype"] == "uint16"  # the debug vocab has 500 tokens
    assert metadata["num_documents"] == len(documents)
    corpus_tokens = TokenCorpus(token_dir, tokenizer)
    stored = np.concatenate([np.asarray(t) for t in corpus_tokens.tokens])
    assert stored.tolist() == [t for d in documents for t in d]  # in order, EOS after each
    ends = np.concatenate([e + start for e, start in zip(corpus_tokens.ends, corpus_tokens.shard_starts)])
    assert ends.tolist() == np.cumsum([len(d) for d in documents]).tolist()
    # A span across shards and over the end of the corpus (the next epoch begins).
    total = corpus_tokens.num_tokens
    tokens, span_ends = corpus_tokens.span(total - 30, 60)
    assert tokens.tolist() == stored[-30:].tolist() + stored[:30].tolist()
    assert 30 in span_ends.tolist()


@pytest.mark.parametrize("padded_len", [SEQ_LEN, SEQ_LEN + 4])
def test_tokenized_rows_equal_on_the_fly_packing(streams, padded_len):
    """Three epochs, and a change of row length halfway (a staged context extension)."""
    raw, tokens = streams["raw"](), streams["tokens"]()
    for index in range(320):
        row = RowLength(SEQ_LEN, padded_len) if index < 160 else RowLength(SEQ_LEN // 2, padded_len)
        assert_rows_equal(next_row(tokens, row), next_row(raw, row), f"row {index}")


def reference_steps(make_stream, global_batch: int, schedule: RowSchedule, steps: int) -> list[list[dict]]:
    stream = make_stream()
    return [[next_row(stream, schedule.at(step)) for _ in range(global_batch)] for step in range(1, steps + 1)]


@pytest.mark.parametrize("kind", ["raw", "tokens"])
def test_global_batch_is_identical_under_dp_1_2_4(streams, kind):
    """Micro-batch m of dp rank r holds rows [(m*dp + r)*b, (m*dp + r + 1)*b) of the step's global batch."""
    global_batch, steps, schedule = 8, 3, RowSchedule.constant(SEQ_LEN, 1)
    want = reference_steps(streams[kind], global_batch, schedule, steps)
    for dp, b in [(1, 8), (1, 2), (2, 1), (2, 2), (4, 2)]:
        loaders = [StepLoader(streams[kind](), schedule, b, global_batch, dp, rank) for rank in range(dp)]
        for step in range(steps):
            for rank, loader in enumerate(loaders):
                for m, microbatch in enumerate(loader.next_step(step + 1).microbatches):
                    for i in range(b):
                        got = {key: value[i] for key, value in microbatch.items()}
                        assert_rows_equal(got, want[step][(m * dp + rank) * b + i], f"{kind} dp={dp} b={b} step {step} rank {rank} mb {m}")
        for loader in loaders:
            loader.close()


@pytest.mark.parametrize("kind", ["raw", "tokens"])
def test_resume_restores_the_exact_position_and_stage(streams, kind):
    """A state saved under dp2 after 3 steps (the thread has built more), through JSON as the
    checkpoint stores it, resumes under dp4 at step 4; the schedule halves the row at step 6, and
    the prefetch thread builds every step at its own stage's length."""
    global_batch, schedule = 8, RowSchedule(((0, SEQ_LEN), (6, SEQ_LEN // 2)), multiple=4)
    want = reference_steps(streams[kind], global_batch, schedule, 7)
    first = StepLoader(streams[kind](), schedule, 1, global_batch, 2, 0)
    for step in range(1, 4):
        first.next_step(step)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = StepLoader(streams[kind](), schedule, 2, global_batch, 4, 3)
    resumed.load_state_dict(state)
    for step in range(4, 8):
        got = resumed.next_step(step)
        assert got.row == schedule.at(step) and got.microbatches[0]["input_ids"].shape == (2, schedule.at(step).padded)
        for i in range(2):
            assert_rows_equal({k: v[i] for k, v in got.microbatches[0].items()}, want[step - 1][6 + i], f"{kind} resumed step {step}")
    resumed.close()


def test_error_in_the_prefetch_thread_reaches_next_step():
    def encode(record):
        if record["n"] == 99:
            raise DataError("record 1 is broken")
        return [1] * record["n"], [1] * record["n"]

    loader = StepLoader(PackedStream([{"n": 32}, {"n": 99}], encode, 0), RowSchedule.constant(32, 1), 1, 1, 1, 0)
    loader.next_step(1)  # the first document fills the first row
    with pytest.raises(DataError, match="record 1 is broken"):
        loader.next_step(2)


def test_whole_documents_are_cut_to_the_row_and_counted(capsys):
    """SFT and policy never split a document: one longer than the step's row is cut to it (every
    kept token still sees all before it), each pass says how many, and a pass that keeps no
    labelled token is refused."""
    docs = [{"n": 10}, {"n": 40}]
    stream = PackedStream(docs, lambda r: (list(range(r["n"])), list(range(1, r["n"])) + [IGNORE_INDEX]), 0,
                          split_documents=False, name="sft: conversations of x.jsonl")
    rows = stream.next_rows(2, [0, 1], RowLength(16, 16))
    assert rows[0]["input_ids"][:10].tolist() == list(range(10)) and rows[0]["labels"][10:].eq(IGNORE_INDEX).all()
    assert rows[1]["input_ids"].tolist() == list(range(16))  # the 40-token document, cut to the row
    assert "sft: conversations of x.jsonl: 1 of 2 were cut to rows of 16 tokens" in capsys.readouterr().out
    unlabelled = PackedStream(docs, lambda r: ([1] * r["n"], [IGNORE_INDEX] * r["n"]), 0, split_documents=False, name="policy")
    with pytest.raises(DataError, match="policy: no document keeps a labelled token within rows of 16 tokens"):
        unlabelled.next_rows(2, [], RowLength(16, 16))


def test_refusals(corpus, token_dir, tmp_path):
    """Another tokenizer, a recipe that cannot read tokens, an output folder in use: one line each."""
    other = tmp_path / "other_tokenizer"
    shutil.copytree(ASSETS, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]  # same vocabulary, other tokenization
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match="tokenized with another tokenizer") as refused:
        build_recipe(job_config(token_dir, "--model.hf_assets_path", str(other)))
    with pytest.raises(DataError, match="only recipe.name=pretrain reads") as sft:
        build_recipe(job_config(token_dir, "--recipe.name", "sft"))
    with pytest.raises(DataError, match="already exists") as exists:
        tokenize_corpus(corpus, token_dir, ASSETS, "auto", "text", workers=1, shard_tokens=1000)
    for error in (refused, sft, exists):
        assert "\n" not in str(error.value)


def test_debug_assets_regenerate_identically_and_a_larger_corpus_extends_the_shipped_one(tmp_path):
    """make_debug_assets.py rewrites every shipped file byte for byte; --corpus-docs N writes N
    documents whose first 2,000 are the shipped corpus (so the shipped tokenizer fits them)."""
    make_debug_assets.main(["--out-dir", str(tmp_path / "assets")])
    for name in os.listdir(ASSETS):
        with open(os.path.join(ASSETS, name), "rb") as shipped, open(tmp_path / "assets" / name, "rb") as made:
            assert shipped.read() == made.read(), name
    make_debug_assets.main(["--out-dir", str(tmp_path / "more"), "--corpus-docs", "2500", "--corpus-only"])
    assert os.listdir(tmp_path / "more") == ["corpus.jsonl"]
    with open(os.path.join(ASSETS, "corpus.jsonl")) as shipped, open(tmp_path / "more" / "corpus.jsonl") as more:
        lines = more.readlines()
        assert len(lines) == 2500 and lines[:2000] == shipped.readlines()
