"""scripts/eval_long.py end to end on the debug model (random init, CPU): its printed and saved
numbers against a direct computation with plain logits, and the same numbers under cp2 and dp2."""

import contextlib
import io
import json

import pytest
import torch

from longctx.base import IGNORE_INDEX
from longctx.checkpoint.source import weight_source
from longctx.launch import validate
from longctx.modeling import build_model
from scripts import eval_long
from tests.distributed_harness import run_on_ranks
from tests.test_recipes import one_rank, rank_env

LENGTH = 256
ARGS = ["--job.config_file", "train_configs/debug.toml", "--length", str(LENGTH), "--rows", "2",
        "--passkey-lengths", "192", "256", "--depths", "0", "1", "--trials", "1", "--comm.init_timeout_seconds", "90"]


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


def test_passkey_row_hides_the_key_at_its_depth():
    tokenizer = validate(eval_long.parse_args(ARGS)[1]).recipe.tokenizer
    needle = tokenizer.encode(eval_long.NEEDLE.format(key=12345))
    starts = []
    for depth in (0.0, 0.5, 1.0):
        tokens, labels = eval_long.passkey_row(tokenizer, 200, depth, 12345)
        assert len(tokens) == len(labels) == 200
        answer = tokenizer.encode(" 12345")
        assert [l for l in labels if l != IGNORE_INDEX] == answer and tokens[-len(answer):] == answer
        starts.append(next(i for i in range(200) if tokens[i : i + len(needle)] == needle))
    intro = len(tokenizer.encode(eval_long.INTRO))
    assert starts[0] == intro and starts[0] < starts[1] < starts[2]


def test_numbers_equal_a_direct_computation(one_process):
    results, printed, out = one_process
    args, job_config = eval_long.parse_args(ARGS)
    with one_rank():
        job = validate(job_config)
        spec, model_args, parallel_dims, recipe, settings = job.spec, job.model_args, job.parallel_dims, job.recipe, job.settings
        model = build_model(spec, model_args, parallel_dims, settings, torch.device("cpu"), weight_source(job_config)).eval()
        rows = eval_long.corpus_rows(recipe, LENGTH, 2)
        with torch.no_grad():
            logprobs = torch.stack([model(torch.tensor([t])).log_softmax(-1)[0].gather(-1, torch.tensor(l)[:, None])[:, 0]
                                    for t, l in rows])
            edges = eval_long.bucket_edges(LENGTH)
            for bucket, lo, hi in zip(results["buckets"], edges, edges[1:]):
                assert (bucket["from"], bucket["to"], bucket["tokens"]) == (lo, hi, 2 * (hi - lo))
                assert bucket["loss"] == pytest.approx(-logprobs[:, lo:hi].mean().item(), abs=1e-5)
            rng = eval_long.random.Random(0)  # the script's keys: one trial per cell, in order
            for cell in results["passkey"]:
                tokens, labels = eval_long.passkey_row(recipe.tokenizer, cell["length"], cell["depth"], rng.randrange(10000, 100000))
                answer = torch.tensor(labels) != IGNORE_INDEX
                predicted = model(torch.tensor([tokens]))[0].argmax(-1)
                assert cell["accuracy"] == float((predicted[answer] == torch.tensor(labels)[answer]).all()), cell
    assert [(c["length"], c["depth"]) for c in results["passkey"]] == [(n, d) for n in (192, 256) for d in (0.0, 1.0)]
    assert "loss by position" in printed and "128-256" in printed and "passkey accuracy" in printed
    assert (out / "passkey.png").is_file()


def layouts(out: str) -> dict:
    results = {}
    for name, layout in {"cp2": ["--parallelism.context_parallel_degree", "2"], "dp2": []}.items():
        args, job_config = eval_long.parse_args(ARGS + layout)
        job = validate(job_config)
        results[name] = eval_long.evaluate(job_config, job, args, torch.device("cpu"))
    return results


def test_cp2_and_dp2_equal_one_process(one_process, tmp_path):
    want = one_process[0]
    for name, got in run_on_ranks(2, layouts, str(tmp_path)).items():
        assert got["passkey"] == want["passkey"], name
        for g, w in zip(got["buckets"], want["buckets"]):
            assert g["loss"] == pytest.approx(w["loss"], abs=1e-5), (name, g, w)
