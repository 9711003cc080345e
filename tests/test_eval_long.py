"""scripts/eval_long.py end to end on the debug model (random init, CPU): its printed and saved
numbers against a direct computation with plain logits (loss by position, passkey and multi-key),
the same numbers under cp2 and dp2, and in transformers (--backend transformers); its rows; the
corpus as a token folder; an --out-dir it cannot write refused before any work."""

import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch

from longctx.base import IGNORE_INDEX, ConfigError, DataError
from longctx.checkpoint.source import weight_source
from longctx.data import retrieval
from longctx.data.tokenize_corpus import tokenize_corpus
from longctx.launch import validate
from longctx.modeling import build_model
from scripts import eval_long
from tests.distributed_harness import run_on_ranks
from tests.test_recipes import one_rank, rank_env

LENGTH = 256
ARGS = ["--job.config_file", "train_configs/debug.toml", "--length", str(LENGTH), "--rows", "2",
        "--retrieval-lengths", "192", "256", "--depths", "0", "1", "--trials", "1", "--keys", "2",
        "--comm.init_timeout_seconds", "90"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_long")
    printed = io.StringIO()
    with rank_env(), contextlib.redirect_stdout(printed):
        eval_long.main(ARGS + ["--out-dir", str(out), "--job.dump_folder", str(out)])
    with open(out / "eval_long.json") as f:
        return json.load(f), printed.getvalue(), out


def test_bucket_edges():
    assert eval_long.bucket_edges(131072) == [0, 4096, 8192, 16384, 32768, 65536, 131072]
    assert eval_long.bucket_edges(32768) == [0, 2048, 4096, 8192, 16384, 32768]
    assert eval_long.bucket_edges(256) == [0, 16, 32, 64, 128, 256]
    assert eval_long.bucket_edges(100) == [0, 6, 12, 24, 48, 96, 100]


def debug_words() -> retrieval.Words:
    return retrieval.Words(validate(eval_long.parse_args(ARGS + ["--out-dir", "/tmp"])[1]).recipe.tokenizer)


def find(tokens: list[int], piece: list[int]) -> list[int]:
    return [i for i in range(len(tokens)) if tokens[i : i + len(piece)] == piece]


def test_passkey_row_hides_the_key_at_its_depth():
    words = debug_words()
    needle = words.encode(retrieval.NEEDLE.format(key=12345))
    answer = words.encode(" 12345")
    starts = []
    for depth in (0.0, 0.5, 1.0):
        tokens, labels = eval_long.labelled(*retrieval.passkey_tokens(words, 200, depth, 12345))
        assert len(tokens) == len(labels) == 200
        assert [label for label in labels if label != IGNORE_INDEX] == answer and tokens[-len(answer):] == answer
        starts += find(tokens, needle)
    intro = len(words.encode(retrieval.INTRO))
    assert starts[0] == intro and starts[0] < starts[1] < starts[2]
    assert words.word_starts(words.encode(retrieval.FILLER))[0], "the needle goes in before a word"


def test_multikey_row_holds_every_needle_and_asks_for_one():
    words = debug_words()
    haystack = eval_long.NaturalText(words, np.array(words.encode(" the fast fox sees the red river ." * 40)))
    pairs = [("fox", 11111), ("river", 22222), ("robot", 33333)]
    tokens, answer_len = retrieval.multikey_tokens(words, haystack.window(eval_long.random.Random(0), 400), 400, pairs,
                                                   [0.9, 0.0, 0.5], asked=0)
    assert len(tokens) == 400
    positions = [find(tokens, words.encode(retrieval.MULTIKEY_NEEDLE.format(name=n, value=v))) for n, v in pairs]
    assert [len(p) for p in positions] == [1, 1, 1] and positions[1] < positions[2] < positions[0], "in depth order"
    question = words.encode(retrieval.MULTIKEY_QUESTION.format(name="fox"))
    assert tokens[-answer_len - len(question) :] == question + words.encode(" 11111")
    with pytest.raises(ConfigError, match="shorter than its prompt"):
        retrieval.multikey_tokens(words, haystack.stream, 120, pairs, [0.0] * 3, asked=0)


def direct_hits(model, rows) -> list[bool]:
    """Plain logits of the unsharded model: every answer token the argmax?"""
    hits = []
    for tokens, labels in rows:
        answer = torch.tensor(labels) != IGNORE_INDEX
        predicted = model(torch.tensor([tokens]))[0].argmax(-1)
        hits.append(bool((predicted[answer] == torch.tensor(labels)[answer]).all()))
    return hits


def test_numbers_equal_a_direct_computation(one_process):
    results, printed, out = one_process
    args, job_config = eval_long.parse_args(ARGS + ["--out-dir", str(out)])
    with one_rank(), torch.no_grad():
        job = validate(job_config)
        recipe = job.recipe
        model = build_model(job.spec, job.model_args, job.parallel_dims, job.settings, torch.device("cpu"),
                            weight_source(job_config)).eval()
        loss_rows, tasks, _ = eval_long.evaluation_rows(recipe, args)
        logprobs = torch.stack([model(torch.tensor([t])).log_softmax(-1)[0].gather(-1, torch.tensor(labels)[:, None])[:, 0]
                                for t, labels in loss_rows])
        edges = eval_long.bucket_edges(LENGTH)
        for bucket, lo, hi in zip(results["buckets"], edges, edges[1:]):
            assert (bucket["from"], bucket["to"], bucket["tokens"]) == (lo, hi, 2 * (hi - lo))
            assert bucket["loss"] == pytest.approx(-logprobs[:, lo:hi].mean().item(), abs=1e-5)
        rng = eval_long.random.Random(0)  # the passkey keys: one trial per cell, in order
        words = retrieval.Words(recipe.tokenizer)
        passkey_rows = [eval_long.labelled(*retrieval.passkey_tokens(words, n, d, rng.randrange(10000, 100000)))
                        for n in (192, 256) for d in (0.0, 1.0)]
        assert tasks["passkey"][1] == passkey_rows
        for task, (_, rows) in tasks.items():
            assert [hit for cell in results[task] for hit in cell["hits"]] == direct_hits(model, rows), task
    for task in eval_long.TASKS:
        assert [(c["length"], c["depth"]) for c in results[task]] == [(n, d) for n in (192, 256) for d in (0.0, 1.0)]
        assert all(c["accuracy"] == sum(c["hits"]) / len(c["hits"]) for c in results[task])
    assert "loss by position" in printed and "128-256" in printed and "multikey accuracy" in printed


def test_multikey_accuracy_counts_trials_whose_answer_is_all_argmax():
    """retrieval_accuracy on made-up scores: a trial passes only if every answer token is the argmax."""
    labels = [IGNORE_INDEX, 5, 6, IGNORE_INDEX]
    argmax = [[1, 1, 1, 0], [0, 1, 0, 1], [1, 1, 1, 1]]  # pass, fail (one answer token wrong), pass
    scores = [torch.tensor([[0.0, a] for a in row]) for row in argmax]
    cells = [(4, 0.0), (4, 0.0), (4, 1.0)]
    got = eval_long.retrieval_accuracy(scores, cells, [([0] * 4, labels)] * 3)
    assert got == [{"length": 4, "depth": 0.0, "accuracy": 0.5, "hits": [True, False]},
                   {"length": 4, "depth": 1.0, "accuracy": 1.0, "hits": [True]}]


def layouts(out: str) -> dict:
    results = {}
    for name, layout in {"cp2": ["--parallelism.context_parallel_degree", "2"], "dp2": []}.items():
        args, job_config = eval_long.parse_args(ARGS + layout + ["--out-dir", out])
        job = validate(job_config)
        results[name] = eval_long.evaluate(job_config, job, args, torch.device("cpu"))
    return results


def test_cp2_and_dp2_equal_one_process(one_process, tmp_path):
    want = one_process[0]
    for name, got in run_on_ranks(2, layouts, str(tmp_path)).items():
        for task in eval_long.TASKS:
            assert got[task] == want[task], (name, task)
        for g, w in zip(got["buckets"], want["buckets"]):
            assert g["loss"] == pytest.approx(w["loss"], abs=1e-5), (name, g, w)


def test_transformers_reproduces_longctx(hf_dir, tmp_path):
    """The same rows of an HF folder in transformers (fp32, CPU): the same losses and trials."""
    args = ["--model-dir", hf_dir, "--model.hf_assets_path", "assets/debug", "--corpus", "assets/debug/corpus.jsonl",
            "--length", "256", "--rows", "2", "--retrieval-lengths", "256", "--depths", "0", "1", "--trials", "2", "--keys", "2"]
    results = {}
    for backend in ("longctx", "transformers"):
        with rank_env(), contextlib.redirect_stdout(io.StringIO()):
            eval_long.main(args + ["--backend", backend, "--out-dir", str(tmp_path / backend)])
        results[backend] = json.loads((tmp_path / backend / "eval_long.json").read_text())
    ours, theirs = results["longctx"], results["transformers"]
    assert (ours["backend"], theirs["backend"]) == ("longctx", "transformers")
    for a, b in zip(ours["buckets"], theirs["buckets"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), (a, b)
    for task in eval_long.TASKS:
        assert [c["hits"] for c in ours[task]] == [c["hits"] for c in theirs[task]], task


def test_token_folder_corpus_gives_the_same_tokens(tmp_path):
    """--corpus TOKENS_DIR (scripts/tokenize_corpus.py) reads what the documents themselves give."""
    tokens_dir = str(tmp_path / "tokens")
    tokenize_corpus("assets/debug/corpus.jsonl", tokens_dir, "assets/debug", "auto", "text", workers=1, shard_tokens=2**12)
    streams = []
    for corpus in ("assets/debug/corpus.jsonl", tokens_dir):
        job_config = eval_long.parse_args(ARGS + ["--corpus", corpus, "--out-dir", str(tmp_path)])[1]
        streams.append(eval_long.corpus_tokens(validate(job_config).recipe, 3 * 2**12))  # across shards
    assert np.array_equal(*streams)
    with pytest.raises(DataError, match=r"--corpus holds \d+ tokens, fewer than"):
        eval_long.corpus_tokens(validate(job_config).recipe, 10**9)


def test_unwritable_out_dir_is_refused_before_any_work(tmp_path):
    afile = tmp_path / "results.json"
    afile.write_text("{}")
    for out_dir, message in ((afile, "is a file"), (afile / "sub", "cannot be written")):
        with pytest.raises(ConfigError, match=re.escape(f"--out-dir {str(out_dir)!r} {message}")):
            eval_long.parse_args(ARGS + ["--out-dir", str(out_dir)])
