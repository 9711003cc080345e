"""The job-config parser and VALUE_RULES, on parse_config itself (no process, no model): every
command-line form the repo uses, a TOML with every key, one-line refusals that name the key, and
--help through launch.run."""

import json
import os

import pytest

from longctx.base import MAX_SEQ_LEN, ConfigError
from longctx.config import JobConfig, parse_config
from longctx.config.parse import SECTIONS, docstrings, keys
from tests.conftest import ROOT

DEBUG = os.path.join(ROOT, "train_configs", "debug.toml")
CORPUS = os.path.join(ROOT, "assets", "debug", "corpus.jsonl")


def value_of(config: JobConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def refusal(args: list[str]) -> str:
    with pytest.raises(ConfigError, match=None) as info:
        parse_config(args)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def write_toml(path, text: str) -> list[str]:
    path.write_text(text)
    return ["--job.config_file", str(path)]


# ---- command-line forms ------------------------------------------------------------------------

@pytest.mark.parametrize("args, key, value", [
    (["--training.steps", "7"], "training.steps", 7),
    (["--training.steps=7"], "training.steps", 7),
    (["--optimizer.lr", "3e-4"], "optimizer.lr", 3e-4),
    (["--optimizer.lr", "1"], "optimizer.lr", 1.0),
    (["--parallelism.data_parallel_shard_degree", "-1"], "parallelism.data_parallel_shard_degree", -1),
    (["--parallelism.fsdp_reshard_after_forward=never"], "parallelism.fsdp_reshard_after_forward", "never"),
    (["--training.seq-len", "512"], "training.seq_len", 512),  # dashes read as underscores
    (["--checkpoint.enable"], "checkpoint.enable", True),
    (["--checkpoint.enable=false"], "checkpoint.enable", False),
    (["--checkpoint.enable", "False"], "checkpoint.enable", False),
    (["--compile.no-enable"], "compile.enable", False),
    (["--compile.enable", "--compile.no_enable"], "compile.enable", False),  # the later flag wins
    (["--metrics.no-enable-tensorboard"], "metrics.enable_tensorboard", False),
    (["--checkpoint.initial_load_path", "/x", "--checkpoint.initial_load_path", "None"], "checkpoint.initial_load_path", None),
    (["--model.rope_scaling", "type", "yarn", "factor", "4.0", "original_max_position_embeddings", "32768", "truncate", "false"],
     "model.rope_scaling", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "truncate": False}),
    (["--recipe.chat_template_kwargs", "enable_thinking", "False", "style", "terse"],
     "recipe.chat_template_kwargs", {"enable_thinking": False, "style": "terse"}),
    (["--recipe.chat_template_kwargs"], "recipe.chat_template_kwargs", {}),
])
def test_command_line_forms(args, key, value):
    got = value_of(parse_config(["--job.config_file", DEBUG, *args]), key)
    assert got == value and type(got) is type(value), (got, value)


def test_command_line_wins_over_the_toml_wherever_the_file_is_named():
    config = parse_config(["--training.steps", "3", "--job.config_file", DEBUG])
    assert config.training.steps == 3 and config.training.seq_len == 256  # the rest from debug.toml


@pytest.mark.parametrize("args, message", [
    (["--training.bogus_key", "1"], "unknown config key --training.bogus_key; valid keys of [training]: balance, dataset, dataset_path"),
    (["--bogus_section.x", "1"], "unknown config section in '--bogus_section.x'; valid sections: job, model, training"),
    (["--training", "1"], "--training names a section, not a key"),
    (["--parallelism.pipeline_parallel_degree", "2"], "unknown config key --parallelism.pipeline_parallel_degree"),
    (["--checkpoint.initial_load_model_only"], "unknown config key --checkpoint.initial_load_model_only"),  # pinned, not a key
    (["--training.steps", "abc"], "training.steps='abc' must be an integer (--training.steps)"),
    (["--optimizer.lr", "fast"], "optimizer.lr='fast' must be a number"),
    (["--checkpoint.enable=maybe"], "checkpoint.enable='maybe' must be true or false"),
    (["--activation_checkpoint.mode", "bogus"], "activation_checkpoint.mode='bogus' must be one of 'selective', 'full', 'none'"),
    (["--compile.no-enable=true"], "--compile.no-enable takes no value"),
    (["--training.steps"], "--training.steps needs a value (an integer)"),
    (["--training.steps", "1", "2"], "unexpected argument '2' after --training.steps"),
    (["stray"], "unexpected argument 'stray'"),
    (["--model.rope_scaling", "type", "yarn", "factor"], "--model.rope_scaling takes NAME VALUE pairs"),
    (["--training.seq_len_schedule", "[[0, 64]]"], "training.seq_len_schedule is a list: set it in the TOML file"),
    (["--job.config_file", "missing.toml"], "--job.config_file 'missing.toml' does not exist"),
])
def test_command_line_mistakes_are_one_line(args, message):
    assert message in refusal(args)


@pytest.mark.parametrize("text, message", [
    ("[training]\nsteps = 3\nbogus_key = 1\n",
     "job.toml: unknown config key training.bogus_key; valid keys of [training]: balance, dataset,"),
    ("[quantize.linear.float8]\nemulate = true\n", "job.toml: unknown config section [quantize]; valid sections: job,"),
    ("[validation.dataloader]\nnum_workers = 2\n", "job.toml: unknown config key validation.dataloader; valid keys of [validation]"),
    ("steps = 3\n", "job.toml: steps = 3 stands outside any [section]"),
    ('[training]\nsteps = "abc"\n', "training.steps='abc' must be an integer ("),
    ("[training]\nsteps = 3.0\n", "training.steps=3.0 must be an integer"),
    ('[model]\nrope_scaling = "yarn"\n', "model.rope_scaling='yarn' must be a table"),
    ("[training]\nseq_len_schedule = [0, 256]\n", "training.seq_len_schedule=[0, 256] must be a list of lists of integers"),
    ('[training]\nseq_len_schedule = [[0, "64"], [4, 256]]\n', "training.seq_len_schedule=[[0, '64'], [4, 256]] must be a list"),
    ("[training]\nseq_len_schedule = [[0, 64.0], [4, 256]]\n", "must be a list of lists of integers"),
    ("[training\nsteps = 3\n", "job.toml:1: TOML syntax error: "),
    ("[training]\nsteps = \n", "job.toml:2: TOML syntax error: "),
])
def test_toml_mistakes_are_one_line(tmp_path, text, message):
    assert message in refusal(write_toml(tmp_path / "job.toml", text))


# ---- every key, both ways ----------------------------------------------------------------------

def every_key(tmp_path) -> dict[str, dict]:
    """A value other than the default for every key (where the rules allow one on CPU), all valid together."""
    dump = str(tmp_path / "dump")
    return {
        "job": {"dump_folder": dump, "description": "every key"},
        "model": {"name": "qwen2", "flavor": "debugmodel", "hf_assets_path": "assets/debug",
                  "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 1.1,
                                   "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False}},
        "training": {"dataset": "json", "dataset_path": CORPUS, "local_batch_size": 2, "global_batch_size": 8, "seq_len": 128,
                     "seq_len_schedule": [[0, 64], [3, 128]], "steps": 5, "max_norm": 0.5, "enable_cpu_offload": True,
                     "mixed_precision_param": "float32", "gc_freq": 7, "skip_nonfinite_steps": 2, "balance": "none"},
        "parallelism": {"data_parallel_replicate_degree": 2, "data_parallel_shard_degree": 2, "fsdp_reshard_after_forward": "never",
                        "tensor_parallel_degree": 1, "disable_loss_parallel": True, "context_parallel_degree": 4,
                        "context_parallel_ulysses_degree": 2},
        "checkpoint": {"enable": True, "folder": "ckpt", "interval": 3, "initial_load_path": "/some/hf", "initial_load_in_hf": True,
                       "last_save_in_hf": True, "export_dtype": "bfloat16", "async_mode": "async", "keep_latest_k": 3, "load_step": 4,
                       "load_only": True,
                       "export_interval": 2, "export_max_shard_gb": 0.5},
        "activation_checkpoint": {"mode": "selective", "selective_ac_option": "op", "cpu_offload": True, "mlp_chunk_size": 32,
                                  "attention_kv_groups": 2, "memory_budget_gib": 70.0},
        "compile": {"enable": True, "backend": "eager"},
        "optimizer": {"name": "Adam", "lr": 1e-3, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.0,
                      "implementation": "foreach"},
        "lr_scheduler": {"warmup_steps": 2, "total_steps": 10, "decay_ratio": 0.5, "decay_type": "cosine", "min_lr_factor": 0.1},
        "metrics": {"log_freq": 2, "enable_tensorboard": True, "save_tb_folder": "tensorboard"},
        "comm": {"init_timeout_seconds": 60},
        "debug": {"seed": 3, "deterministic": True, "deterministic_warn_only": True},
        "validation": {"enable": True, "dataset": "json", "dataset_path": CORPUS, "local_batch_size": 1, "seq_len": 64, "freq": 2,
                       "steps": 3},
        "profiling": {"enable_profiling": True, "save_traces_folder": "traces", "profile_freq": 5, "profiler_active": 2,
                      "profiler_warmup": 1, "enable_memory_snapshot": False, "save_memory_snapshot_folder": "snapshots",
                      "all_ranks": True},
        "recipe": {"name": "sft", "text_field": "body", "messages_field": "turns", "chat_template_kwargs": {"enable_thinking": False},
                   "apply_chat_template": True, "loss_chunk_size": 256, "clip_eps": 0.1},
    }


def toml_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def test_the_sample_sets_every_key(tmp_path):
    sample = every_key(tmp_path)
    sample["job"]["config_file"] = "(the file itself)"
    assert {s: set(t) for s, t in sample.items()} == {s: set(keys(c)) for s, c in SECTIONS.items()}


def test_every_key_round_trips_through_toml(tmp_path):
    sample = every_key(tmp_path)
    text = "\n".join(f"[{section}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items()) for section, table in sample.items())
    config = parse_config(write_toml(tmp_path / "every.toml", text))
    assert config.job.config_file == str(tmp_path / "every.toml")
    got = {section: {k: getattr(getattr(config, section), k) for k in table} for section, table in sample.items()}
    assert got == sample


def test_every_scalar_and_table_key_round_trips_through_the_command_line(tmp_path):
    args = []
    for section, table in every_key(tmp_path).items():
        for key, value in table.items():
            if isinstance(value, dict):
                args += [f"--{section}.{key}", *(str(w) for pair in value.items() for w in pair)]
            elif not isinstance(value, list):
                args += [f"--{section}.{key}", str(value)]
    config = parse_config(args)
    for section, table in every_key(tmp_path).items():
        for key, value in table.items():
            if not isinstance(value, list):
                assert getattr(getattr(config, section), key) == value, f"{section}.{key}"


# ---- VALUE_RULES: each refusal names its own key -----------------------------------------------

YARN = "--model.rope_scaling type yarn".split()


@pytest.mark.parametrize("args, message", [
    ([*YARN, "factor", "nan"], "model.rope_scaling.factor=nan must be a finite number >= 1"),
    ([*YARN, "factor", "inf"], "model.rope_scaling.factor=inf must be"),
    ([*YARN, "factor", "0.5"], "model.rope_scaling.factor=0.5 must be"),
    ([*YARN, "factor", "four"], "model.rope_scaling.factor='four' must be"),
    ([*YARN, "factor", "true"], "model.rope_scaling.factor=True must be"),
    ([*YARN, "attention_factor", "0"], "model.rope_scaling.attention_factor=0 must be a finite number > 0"),
    ([*YARN, "attention_factor", "nan"], "model.rope_scaling.attention_factor=nan must be"),
    ([*YARN, "original_max_position_embeddings", "0"], "model.rope_scaling.original_max_position_embeddings=0 must be an integer >= 1"),
    ([*YARN, "original_max_position_embeddings", "1024.5"], "model.rope_scaling.original_max_position_embeddings=1024.5 must be"),
    ([*YARN, "beta_fast", "2", "beta_slow", "2"], "model.rope_scaling.beta_fast=2 must be > model.rope_scaling.beta_slow=2"),
    ([*YARN, "beta_slow", "-1"], "model.rope_scaling.beta_slow=-1 must be a finite number > 0"),
    ([*YARN, "mscale", "-1"], "model.rope_scaling.mscale=-1 must be"),
    ([*YARN, "mscale_all_dim", "inf"], "model.rope_scaling.mscale_all_dim=inf must be"),
    ([*YARN, "truncate", "1"], "model.rope_scaling.truncate=1 must be true or false"),
    (["--model.rope_scaling", "type", "3"], "model.rope_scaling.type=3 must be a string"),
    (["--validation.enable", "--validation.dataset_path", CORPUS, "--validation.freq", "0"], "validation.freq=0 must be >= 1"),
    (["--validation.enable", "--validation.dataset_path", CORPUS, "--validation.steps", "-1"], "validation.steps=-1 must be >= 1"),
    (["--validation.enable", "--validation.dataset_path", CORPUS, "--validation.seq_len", "0"], "validation.seq_len=0 must be -1"),
    (["--validation.enable", "--validation.dataset_path", CORPUS, "--validation.seq_len", str(MAX_SEQ_LEN + 1)],
     f"validation.seq_len={MAX_SEQ_LEN + 1} must be"),
    (["--validation.enable", "--validation.dataset_path", CORPUS, "--validation.local_batch_size", "0"],
     "validation.local_batch_size=0 must be >= 1"),
    (["--validation.enable"], "validation.dataset_path=None must be a file or folder of held-out documents"),
    (["--profiling.enable_profiling", "--profiling.profile_freq", "0"], "profiling.profile_freq=0 must be >= 1"),
    (["--profiling.enable_profiling", "--profiling.profiler_active", "0"], "profiling.profiler_active=0 must be >= 1"),
    (["--profiling.enable_profiling", "--profiling.profiler_warmup", "-1"], "profiling.profiler_warmup=-1 must be >= 0"),
    (["--profiling.enable_profiling", "--profiling.profile_freq", "2"],
     "profiling.profile_freq=2 must be >= profiler_warmup + profiler_active = 3 + 1"),
    (["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "0"],
     "activation_checkpoint.selective_ac_option='0' must be N >= 1"),
    (["--activation_checkpoint.mode", "none", "--activation_checkpoint.cpu_offload"],
     "activation_checkpoint.cpu_offload=True must be false while activation_checkpoint.mode is none"),
    (["--activation_checkpoint.mlp_chunk_size", "-1"], "activation_checkpoint.mlp_chunk_size=-1 must be >= 0"),
    (["--activation_checkpoint.mlp_chunk_size", "64", "--parallelism.tensor_parallel_degree", "2"],
     "activation_checkpoint.mlp_chunk_size=64 must be 0 under tensor parallel"),
    (["--parallelism.tensor_parallel_degree", "0"], "parallelism.tensor_parallel_degree=0 must be >= 1"),
    (["--parallelism.data_parallel_shard_degree", "0"], "parallelism.data_parallel_shard_degree=0 must be -1"),
    (["--parallelism.context_parallel_ulysses_degree", "-2"], "parallelism.context_parallel_ulysses_degree=-2 must be -1"),
    (["--compile.enable", "--compile.backend", "nope"], "compile.backend='nope' must be a torch.compile backend"),
    (["--comm.init_timeout_seconds", "0"], "comm.init_timeout_seconds=0 must be >= 1"),
    (["--metrics.log_freq", "0"], "metrics.log_freq=0 must be >= 1"),
    (["--debug.seed", "-1"], "debug.seed=-1 must be >= 0"),
    (["--debug.seed", str(2**32)], f"debug.seed={2**32} must be"),
    (["--debug.deterministic_warn_only"], "debug.deterministic_warn_only=True must be false unless debug.deterministic"),
    (["--training.skip_nonfinite_steps", "-1"], "training.skip_nonfinite_steps=-1 must be >= 0"),
    (["--recipe.text_field="], "recipe.text_field='' must be a column name"),
])
def test_value_rule_names_its_key(args, message):
    assert message in refusal(["--job.config_file", DEBUG, *args])


@pytest.mark.parametrize("schedule, message", [
    ("[]", "must be a non-empty list of [step, seq_len] integer pairs"),
    ("[[0, 64, 3]]", "must be a non-empty list of [step, seq_len] integer pairs"),
    ("[[1, 64], [4, 256]]", "pairs whose steps start at 0 and increase"),
    ("[[0, 64], [4, 128], [4, 256]]", "pairs whose steps start at 0 and increase"),
    ("[[0, 64], [4, 128]]", "whose largest equals training.seq_len=256"),
    ("[[0, 0], [4, 256]]", "whose lengths are >= 1"),
])
def test_seq_len_schedule_rules(tmp_path, schedule, message):
    text = open(DEBUG).read().replace("seq_len = 256", f"seq_len = 256\nseq_len_schedule = {schedule}")
    line = refusal(write_toml(tmp_path / "s.toml", text))
    assert line.startswith("training.seq_len_schedule=") and message in line, line


def test_compiled_schedule_stays_within_dynamo_recompiles(tmp_path):
    import torch._dynamo

    limit = torch._dynamo.config.recompile_limit
    stages = [[i, 64 * (i + 1)] for i in range(limit + 1)]
    text = open(DEBUG).read().replace("seq_len = 256", f"seq_len = {64 * (limit + 1)}\nseq_len_schedule = {stages}")
    args = write_toml(tmp_path / "s.toml", text)
    parse_config(args)  # eager: any number of stages
    assert f"must be at most {limit} stages under compile.enable" in refusal([*args, "--compile.enable"])


@pytest.mark.parametrize("key, enable", [
    ("checkpoint.folder", "--checkpoint.enable"), ("metrics.save_tb_folder", "--metrics.enable_tensorboard"),
    ("profiling.save_traces_folder", "--profiling.enable_profiling"),
])
def test_output_folder_that_is_a_file_is_refused(tmp_path, key, enable):
    (tmp_path / "taken").write_text("")
    args = ["--job.config_file", DEBUG, "--metrics.no-enable-tensorboard", "--job.dump_folder", str(tmp_path), f"--{key}", "taken"]
    parse_config(args)  # off: nothing is written there
    assert f"{key}='taken' must be a folder name under job.dump_folder" in refusal([*args, enable])


# ---- --help ------------------------------------------------------------------------------------

def test_every_key_has_help():
    for section in SECTIONS.values():
        assert set(docstrings(section)) >= set(keys(section)), section.__name__


def test_help_lists_every_key_with_type_default_and_doc_and_exits_0(capsys):
    from longctx.launch import run
    from longctx.train import main

    assert run(main, ["--job.config_file", DEBUG, "--help"]) == 0
    text = capsys.readouterr().out
    defaults = JobConfig()
    for section, section_class in SECTIONS.items():
        assert f"\n[{section}]\n" in text
        for key in keys(section_class):
            line = next(line for line in text.splitlines() if line.startswith(f"  --{section}.{key} "))
            assert "default" in line and repr(value_of(defaults, f"{section}.{key}")).lower() in line.lower(), line
            assert docstrings(section_class)[key].splitlines()[0] in text
    assert run(main, ["-h"]) == 0
