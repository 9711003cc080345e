"""Every bad input ends in one `error:` line and exit code 2 before work starts, naming the key and
value or the file:line: config values, keys outside our schema (torchtitan's among them), data
files, policy rollouts, the tokenizer, and compute_logprobs' output path. A corpus smaller than
one row trains.

Each class goes once through train.py's `__main__` (all in one process: tests/run_train_cases.py);
the many values of a class are checked in this process, on the function that refuses them."""

import copy
import json
import os

import pytest

from longctx.base import ConfigError, DataError
from longctx.config import VALUE_RULES, JobConfig, check_config, parse_config
from longctx.data.documents import load_documents
from longctx.data.tokenizer import HFTokenizer
from longctx.recipes.policy import PolicyRecipe
from scripts import compute_logprobs as logprobs_script
from tests.conftest import ROOT
from tests.test_train import CONFIG, run_python

POLICY = os.path.join(ROOT, "train_configs", "debug_policy.toml")
DEBUG_VOCAB = 2048  # the debug model's vocab_size (models/qwen3/__init__.py)
DOCS = "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(3))


def _file(path, text: str | bytes) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def _rollouts(path, record: dict) -> str:
    """A rollouts file: a good rollout on line 1, `record` on line 2."""
    good = {"prompt_ids": [1, 2], "response_ids": [3], "advantage": 1.0}
    return _file(path, "".join(json.dumps(r) + "\n" for r in (good, record)))


# ---- one case per class, end to end: exit code 2, one line -------------------------------------

def _end_to_end_cases(tmp) -> dict[str, tuple[list[str], str]]:
    """name -> (train.py arguments, what the one error line must name)."""
    bad_tokenizer = tmp / "bad_tokenizer"
    bad_tokenizer.mkdir()
    _file(bad_tokenizer / "tokenizer.json", '{"model": {"type": "BPE", ')
    f8 = open(CONFIG).read() + "\n[quantize.linear.float8]\nemulate = true\n"
    return {
        "steps 0": (["--job.config_file", CONFIG, "--training.steps", "0"], "training.steps=0"),
        "seq_len no row can serve": (["--job.config_file", CONFIG, "--training.seq_len", "100000000"], "training.seq_len=100000000"),
        "TOML syntax error": (["--job.config_file", _file(tmp / "broken.toml", "[training]\nsteps = \n")], "broken.toml"),
        "torchtitan key": (["--job.config_file", CONFIG, "--parallelism.pipeline_parallel_degree", "2"],
                           "unknown config key --parallelism.pipeline_parallel_degree"),
        "torchtitan nested TOML section": (["--job.config_file", _file(tmp / "f8.toml", f8)], "unknown config section [quantize]"),
        "empty jsonl": (["--job.config_file", CONFIG, "--training.dataset_path", _file(tmp / "empty.jsonl", "")], "empty.jsonl"),
        "not UTF-8": (["--job.config_file", CONFIG, "--training.dataset_path",
                       _file(tmp / "latin1.jsonl", '\n{"text": "caf\xe9"}\n'.encode("latin-1"))], "latin1.jsonl:2"),
        "corrupt tokenizer.json": (["--job.config_file", CONFIG, "--model.hf_assets_path", str(bad_tokenizer)],
                                   "bad_tokenizer/tokenizer.json"),
        # Pretraining text is checked as it is read: line 4 is reached by step 1's packing.
        "text missing mid-corpus": (["--job.config_file", CONFIG, "--training.seq_len", "64", "--training.local_batch_size", "1",
                                     "--training.dataset_path", _file(tmp / "late.jsonl", DOCS + '{"txt": "x"}\n')], "late.jsonl:4"),
        "token id >= vocab": (["--job.config_file", POLICY, "--training.dataset_path",
                               _rollouts(tmp / "ids.jsonl", {"prompt_ids": [1], "response_ids": [DEBUG_VOCAB], "advantage": 1.0})],
                              "ids.jsonl:2"),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    tmp = tmp_path_factory.mktemp("bad_inputs")
    cases = _end_to_end_cases(tmp)
    # Two short steps where a case trains at all; a case's own arguments come last and win.
    short = ["--job.dump_folder", str(tmp / "dump"), "--training.steps", "2", "--lr_scheduler.warmup_steps", "1",
             "--metrics.no-enable-tensorboard"]
    args = {name: [*short, *a] for name, (a, _) in cases.items()}
    # Two documents of five tokens in all, against rows of 256: epochs wrap ~50 times a row, and it trains.
    args["tiny corpus"] = [*short, "--job.config_file", CONFIG, "--training.steps", "1", "--training.local_batch_size", "1",
                           "--training.dataset_path", _file(tmp / "tiny.jsonl", '{"text": "a b"}\n{"text": "c"}\n')]
    (tmp / "cases.json").write_text(json.dumps(args))
    driver = run_python(os.path.join(ROOT, "tests", "run_train_cases.py"), str(tmp / "cases.json"), str(tmp / "results.json"),
                        timeout=600)
    assert driver.returncode == 0, driver.stderr[-3000:]
    return {name: must for name, (_, must) in cases.items()}, json.loads((tmp / "results.json").read_text())


END_TO_END = ["steps 0", "seq_len no row can serve", "TOML syntax error", "torchtitan key", "torchtitan nested TOML section",
              "empty jsonl", "not UTF-8", "corrupt tokenizer.json", "text missing mid-corpus", "token id >= vocab"]


@pytest.mark.parametrize("case", END_TO_END)
def test_bad_input_exits_2_with_one_line(runs, case):
    must_name, results = runs
    assert set(END_TO_END) == set(must_name)
    result = results[case]
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), \
        f"{case}: stderr should be one 'error:' line, got:\n{result['stderr'][-2000:]}"
    assert result["returncode"] == 2, f"{case}: exit code {result['returncode']}"
    assert must_name[case] in lines[0], f"{case}: {lines[0]!r} does not name {must_name[case]!r}"


def test_corpus_smaller_than_a_row_trains(runs):
    result = runs[1]["tiny corpus"]
    assert result["returncode"] == 0, result["stderr"][-3000:]


# ---- config values, on the checks themselves ---------------------------------------------------

BAD_VALUES = {
    "training.steps": -1, "training.seq_len": 0, "training.local_batch_size": 0, "training.global_batch_size": -2,
    "training.max_norm": float("nan"), "optimizer.lr": float("inf"), "optimizer.beta2": 1.0,
    "lr_scheduler.warmup_steps": -1, "lr_scheduler.decay_ratio": 1.5, "checkpoint.interval": 0, "checkpoint.keep_latest_k": 1,
    "checkpoint.export_max_shard_gb": 0.0, "metrics.log_freq": 0, "recipe.loss_chunk_size": 0, "recipe.clip_eps": -0.1,
    "training.gc_freq": 0, "job.dump_folder": os.path.join(ROOT, "README.md"),
}


@pytest.mark.parametrize("key", list(BAD_VALUES))
def test_bad_value_is_refused_naming_key_and_value(key):
    """A config built or changed in Python meets the same checks as a parsed one."""
    config = JobConfig()
    section, name = key.split(".")
    setattr(getattr(config, section), name, BAD_VALUES[key])
    with pytest.raises(ConfigError, match=None) as info:
        check_config(config)
    assert f"{key}={BAD_VALUES[key]!r}" in str(info.value)


def test_a_choice_outside_its_type_is_refused_in_python_too():
    config = JobConfig()
    config.optimizer.name = "SGD"
    with pytest.raises(ConfigError, match="optimizer.name='SGD' must be one of 'AdamW', 'Adam'"):
        check_config(config)


def test_defaults_pass_every_check():
    check_config(JobConfig())
    assert {rule.key for rule in VALUE_RULES} >= set(BAD_VALUES)


# ---- data files, tokenizer, rollouts, on the readers themselves ---------------------------------

@pytest.mark.parametrize("name, text, must_name", [
    ("blank.jsonl", " \n\n\t\n", "blank.jsonl"),
    ("blank.txt", "  \n \n", "blank.txt"),
    ("malformed.jsonl", DOCS + '{"text": "oops\n', "malformed.jsonl:4"),
    ("array.jsonl", DOCS + "[1, 2]\n", "array.jsonl:4"),
    ("number.jsonl", DOCS + '{"text": 17}\n', "number.jsonl:4"),
])
def test_bad_document_names_file_and_line(tmp_path, name, text, must_name):
    documents = None
    with pytest.raises(DataError, match=None) as info:
        documents = load_documents(_file(tmp_path / name, text))
        documents[len(documents) - 1]  # pretraining text is checked as it is read
    assert must_name in str(info.value) and "\n" not in str(info.value)
    assert documents is None or len(documents) == 4


def test_documents_skip_blank_lines_and_keep_line_numbers(tmp_path):
    documents = load_documents(_file(tmp_path / "gaps.jsonl", "\n" + DOCS.replace("\n", "\n\n")))
    assert len(documents) == 3 and documents[2] == {"text": "document 2"}
    assert documents.where(2).endswith("gaps.jsonl:6")


def test_corrupt_tokenizer_config_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((open(os.path.join(ROOT, "assets", "debug", "tokenizer.json"), "rb")).read())
    _file(tmp_path / "tokenizer_config.json", "{oops")
    with pytest.raises(DataError, match="tokenizer_config.json"):
        HFTokenizer(str(tmp_path))


@pytest.fixture(scope="module")
def policy_config():
    return parse_config(["--job.config_file", POLICY])


@pytest.mark.parametrize("record, message", [
    ({"prompt_ids": [-1], "response_ids": [3], "advantage": 1.0}, "prompt_ids holds -1"),
    ({"prompt_ids": [1.5], "response_ids": [3], "advantage": 1.0}, "prompt_ids holds 1.5"),
    ({"prompt_ids": [1], "response_ids": [True], "advantage": 1.0}, "response_ids holds True"),
    ({"prompt_ids": [1], "response_ids": [3], "advantage": float("nan")}, "advantage=nan"),
    ({"prompt_ids": [1], "response_ids": [3]}, "advantage=None"),
    ({"prompt_ids": [1], "response_ids": [3], "advantage": 1.0, "old_logprobs": [0.5]}, "old_logprobs holds 0.5"),
    ({"prompt_ids": [1], "response_ids": [3], "advantage": 1.0, "old_logprobs": [float("-inf")]}, "old_logprobs holds -inf"),
    ({"prompt_ids": [1], "response_ids": [3], "advantage": 1.0, "old_logprobs": []}, "old_logprobs"),
    ({"prompt": ["hi"], "response": "x", "advantage": 1.0}, "prompt is a list"),
    ({"response": "x", "advantage": 1.0}, "no prompt_ids or prompt"),
])
def test_bad_rollout_is_refused_before_step_1_naming_file_and_line(tmp_path, policy_config, record, message):
    config = copy.deepcopy(policy_config)
    config.training.dataset_path = _rollouts(tmp_path / "rollouts.jsonl", record)
    with pytest.raises(DataError, match=None) as info:
        PolicyRecipe(config)
    assert "rollouts.jsonl:2: " in str(info.value) and message in str(info.value), str(info.value)


def test_rollouts_without_a_response_token_are_refused(tmp_path, policy_config):
    config = copy.deepcopy(policy_config)
    config.training.dataset_path = _file(tmp_path / "empty_responses.jsonl",
                                         json.dumps({"prompt_ids": [1, 2], "response_ids": [], "advantage": 1.0}) + "\n")
    with pytest.raises(DataError, match="no rollout in .*empty_responses.jsonl.* has a response token"):
        PolicyRecipe(config)


def test_compute_logprobs_refuses_missing_output_folder_first(tmp_path):
    """Before the model is even configured: the input does not exist either, and is not reached."""
    out = tmp_path / "no_such_folder" / "out.jsonl"
    with pytest.raises(ConfigError, match="no_such_folder"):
        logprobs_script.main(["--model-dir", str(tmp_path), "--input", str(tmp_path / "missing.jsonl"), "--output", str(out)])
