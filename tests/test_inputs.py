"""Every bad input ends in one `error:` line and exit code 2 before work starts, naming the key and
value or the file:line: config values, inherited torchtitan keys this repo never reads, data files,
policy rollouts, the tokenizer, and compute_logprobs' output path. A corpus smaller than one row
still trains.

All train.py cases run in one process (tests/run_train_cases.py) to pay the torch import once."""

import json
import os

import pytest

from components.config import ConfigError
from scripts import compute_logprobs as logprobs_script
from tests.conftest import ROOT
from tests.test_train import CONFIG, run_python

POLICY = os.path.join(ROOT, "train_configs", "debug_policy.toml")
DEBUG_VOCAB = 2048  # the debug model's vocab_size (models/qwen3/__init__.py)


def _file(path, text: str | bytes) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def _rollouts(path, record: dict) -> str:
    """A rollouts file: a good rollout on line 1, `record` on line 2."""
    good = {"prompt_ids": [1, 2], "response_ids": [3], "advantage": 1.0}
    return _file(path, "".join(json.dumps(r) + "\n" for r in (good, record)))


def _cases(tmp) -> dict[str, tuple[list[str], str]]:
    """name -> (train.py arguments, what the one error line must name)."""
    toml = open(CONFIG).read()
    docs = "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(3))
    bad_tokenizer = tmp / "bad_tokenizer"
    bad_tokenizer.mkdir()
    _file(bad_tokenizer / "tokenizer.json", '{"model": {"type": "BPE", ')
    config = {
        # [training] and friends: values that crashed later or did nothing
        "steps 0": (["--training.steps", "0"], "training.steps=0"),
        "seq_len 0": (["--training.seq_len", "0"], "training.seq_len=0"),
        "seq_len beyond fp32 positions": (["--training.seq_len", "100000000"], "training.seq_len=100000000"),
        "lr NaN": (["--optimizer.lr", "nan"], "optimizer.lr=nan"),
        "lr < 0": (["--optimizer.lr", "-1e-3"], "optimizer.lr=-0.001"),
        "local_batch_size 0": (["--training.local_batch_size", "0"], "training.local_batch_size=0"),
        "global_batch_size 0": (["--training.global_batch_size", "0"], "training.global_batch_size=0"),
        "max_norm 0": (["--training.max_norm", "0"], "training.max_norm=0"),
        "warmup_steps < 0": (["--lr_scheduler.warmup_steps", "-1"], "lr_scheduler.warmup_steps=-1"),
        "checkpoint.interval 0": (["--checkpoint.interval", "0"], "checkpoint.interval=0"),
        "keep_latest_k < 0": (["--checkpoint.keep_latest_k", "-1"], "checkpoint.keep_latest_k=-1"),
        "log_freq 0": (["--metrics.log_freq", "0"], "metrics.log_freq=0"),
        "loss_chunk_size 0": (["--recipe.loss_chunk_size", "0"], "recipe.loss_chunk_size=0"),
        "clip_eps 0": (["--recipe.clip_eps", "0"], "recipe.clip_eps=0"),
        "dump_folder is a file": (["--job.dump_folder", os.path.join(ROOT, "README.md")], "README.md"),
        "TOML syntax error": (["--job.config_file", _file(tmp / "broken.toml", "[training]\nsteps = \n")], "broken.toml"),
        # inherited torchtitan keys this repo never reads
        "pipeline parallel": (["--parallelism.pipeline_parallel_degree", "2"], "parallelism.pipeline_parallel_degree=2"),
        "fault tolerance": (["--fault_tolerance.enable"], "fault_tolerance.enable=True"),
        "nested dataloader key": (["--training.dataloader.num_workers", "2"], "training.dataloader.num_workers=2"),
        "float8 in TOML": (["--job.config_file", _file(tmp / "f8.toml", toml + "\n[quantize.linear.float8]\nemulate = true\n")],
                           "quantize.linear.float8.emulate=True"),
    }
    data = {
        "empty jsonl": (tmp / "empty.jsonl", "", "empty.jsonl"),
        "whitespace-only jsonl": (tmp / "blank.jsonl", " \n\n\t\n", "blank.jsonl"),
        "whitespace-only text": (tmp / "blank.txt", "  \n \n", "blank.txt"),
        "malformed JSON line": (tmp / "malformed.jsonl", '{"text": "oops\n' + docs, "malformed.jsonl:1"),
        "not UTF-8": (tmp / "latin1.jsonl", '\n{"text": "caf\xe9"}\n'.encode("latin-1"), "latin1.jsonl:2"),
        "text not a string": (tmp / "number.jsonl", '{"text": 17}\n' + docs, "number.jsonl:1"),
    }
    cases = {name: ([*args, "--job.config_file", CONFIG] if args[0] != "--job.config_file" else args, must)
             for name, (args, must) in config.items()}
    for name, (path, text, must) in data.items():
        cases[name] = (["--job.config_file", CONFIG, "--training.dataset_path", _file(path, text)], must)
    cases["corrupt tokenizer.json"] = (["--job.config_file", CONFIG, "--model.hf_assets_path", str(bad_tokenizer)],
                                      "bad_tokenizer/tokenizer.json")
    # Pretraining text is checked as it is read: line 4 is reached by step 1's packing.
    cases["text missing mid-corpus"] = (["--job.config_file", CONFIG, "--training.seq_len", "64", "--training.local_batch_size", "1",
                                         "--training.dataset_path", _file(tmp / "late.jsonl", docs + '{"txt": "x"}\n')], "late.jsonl:4")
    policy = {
        "token id >= vocab": ({"prompt_ids": [1], "response_ids": [DEBUG_VOCAB], "advantage": 1.0}, "ids.jsonl:2"),
        "negative token id": ({"prompt_ids": [-1], "response_ids": [3], "advantage": 1.0}, "ids.jsonl:2"),
        "float token id": ({"prompt_ids": [1.5], "response_ids": [3], "advantage": 1.0}, "ids.jsonl:2"),
        "NaN advantage": ({"prompt_ids": [1], "response_ids": [3], "advantage": float("nan")}, "ids.jsonl:2"),
        "positive old logprob": ({"prompt_ids": [1], "response_ids": [3], "advantage": 1.0, "old_logprobs": [0.5]}, "ids.jsonl:2"),
        "prompt text not a string": ({"prompt": ["hi"], "response": "x", "advantage": 1.0}, "ids.jsonl:2"),
    }
    for i, (name, (record, must)) in enumerate(policy.items()):
        (tmp / f"policy{i}").mkdir()
        path = _rollouts(tmp / f"policy{i}" / "ids.jsonl", record)
        cases[name] = (["--job.config_file", POLICY, "--training.dataset_path", path], must)
    no_labels = _file(tmp / "nolabels.jsonl", json.dumps({"prompt_ids": [1, 2], "response_ids": [], "advantage": 1.0}) + "\n")
    cases["no labelled token"] = (["--job.config_file", POLICY, "--training.dataset_path", no_labels], "nolabels.jsonl")
    return cases


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    tmp = tmp_path_factory.mktemp("bad_inputs")
    cases = _cases(tmp)
    # Two short steps where a case trains at all; a case's own arguments come last and win.
    short = ["--job.dump_folder", str(tmp / "dump"), "--training.steps", "2", "--lr_scheduler.warmup_steps", "1"]
    args = {name: [*short, *a] for name, (a, _) in cases.items()}
    # Two short documents, far less than one row of 4096 tokens: epochs wrap, and it trains.
    args["tiny corpus"] = [*short, "--job.config_file", CONFIG, "--training.seq_len", "4096", "--training.local_batch_size", "1",
                           "--training.dataset_path", _file(tmp / "tiny.jsonl", '{"text": "a b"}\n{"text": "c"}\n')]
    (tmp / "cases.json").write_text(json.dumps(args))
    driver = run_python(os.path.join(ROOT, "tests", "run_train_cases.py"), str(tmp / "cases.json"), str(tmp / "results.json"),
                        timeout=600)
    assert driver.returncode == 0, driver.stderr[-3000:]
    return {name: must for name, (_, must) in cases.items()}, json.loads((tmp / "results.json").read_text())


CASE_NAMES = [
    "steps 0", "seq_len 0", "seq_len beyond fp32 positions", "lr NaN", "lr < 0", "local_batch_size 0",
    "global_batch_size 0", "max_norm 0", "warmup_steps < 0", "checkpoint.interval 0", "keep_latest_k < 0", "log_freq 0",
    "loss_chunk_size 0", "clip_eps 0", "dump_folder is a file", "TOML syntax error", "pipeline parallel",
    "fault tolerance", "nested dataloader key", "float8 in TOML", "empty jsonl", "whitespace-only jsonl",
    "whitespace-only text", "malformed JSON line", "not UTF-8", "text not a string", "corrupt tokenizer.json",
    "text missing mid-corpus", "token id >= vocab", "negative token id", "float token id", "NaN advantage",
    "positive old logprob", "prompt text not a string", "no labelled token",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_exits_2_with_one_line(runs, case):
    must_name, results = runs
    result = results[case]
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}: stderr should be one 'error:' line, got:\n{result['stderr'][-2000:]}"
    assert result["returncode"] == 2, f"{case}: exit code {result['returncode']}"
    assert must_name[case] in lines[0], f"{case}: {lines[0]!r} does not name {must_name[case]!r}"


def test_case_list_is_complete(runs):
    assert set(CASE_NAMES) == set(runs[0])


def test_corpus_smaller_than_a_row_trains(runs):
    result = runs[1]["tiny corpus"]
    assert result["returncode"] == 0, result["stderr"][-3000:]


def test_compute_logprobs_refuses_missing_output_folder_first(tmp_path):
    """Before the model is even configured: the input does not exist either, and is not reached."""
    out = tmp_path / "no_such_folder" / "out.jsonl"
    with pytest.raises(ConfigError, match="no_such_folder"):
        logprobs_script.main(["--model-dir", str(tmp_path), "--input", str(tmp_path / "missing.jsonl"), "--output", str(out)])
