"""RoPE scaling (YaRN, linear) against transformers, and staged context extension.

Tiny models pretrain at 32 positions (original_max_position_embeddings) and run 128, so most
positions sit past the pretraining length, where scaled frequencies and YaRN's attention factor
decide the logits. Parity: 1 rank directly; dp2, cp2 and tp2 through scripts/compute_logprobs.py
(packed rows, positions restarting per rollout) in one 2-rank group."""

import dataclasses
import random
import re

import pytest
import torch
import torch.distributed as dist
import transformers

from longctx import train
from longctx.base import ConfigError
from longctx.checkpoint.hf import export_hf
from longctx.config import parse_config
from longctx.data.loader import RowSchedule
from longctx.launch import validate
from longctx.modeling import hf_folder_args, model_spec_and_args
from longctx.models import get_model_spec
from longctx.models.common.args import args_from_hf_config
from longctx.models.common.decoder import Decoder
from longctx.models.common.rope import RopeScaling, rope_scaling_from_dict
from scripts import compute_logprobs as logprobs_script
from tests.conftest import assert_rel_close, randomize_parameters
from tests.distributed_harness import run_on_ranks
from tests.test_models import load_ours_from_hf
from tests.test_recipes import assert_logprobs_match, one_rank, write_jsonl

TOL = 1e-5
SEQ = 128
SHAPE = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
YARN_TOML = '{type = "yarn", factor = 4.0, original_max_position_embeddings = 32}'
# Every key transformers' YaRN reads, each changing the frequencies or the attention factor.
SCALINGS = {
    "qwen3-yarn": ("qwen3", YARN),
    "qwen2-yarn-betas-untruncated": ("qwen2", YARN | {"beta_fast": 16.0, "beta_slow": 2.0, "truncate": False}),
    "qwen3-yarn-mscale": ("qwen3", YARN | {"factor": 8.0, "mscale": 1.0, "mscale_all_dim": 0.5}),
    "qwen2-yarn-attention-factor": ("qwen2", YARN | {"attention_factor": 1.3}),
    "qwen3-linear": ("qwen3", {"rope_type": "linear", "factor": 4.0}),
    "qwen2-linear": ("qwen2", {"rope_type": "linear", "factor": 2.0}),
}


@pytest.fixture(scope="module")
def tiny_scaled(make_tiny_hf):
    """name -> TinyHF whose config.json carries that rope scaling."""
    def make(name):
        family, scaling = SCALINGS[name]
        extra = {"head_dim": 16} if family == "qwen3" else {}
        return make_tiny_hf(family, **SHAPE, **extra, rope_parameters={"rope_theta": 10000.0, **scaling})
    return make


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", SCALINGS)
def test_logits_match_transformers_past_original_length(tiny_scaled, name):
    tiny = tiny_scaled(name)
    ours = load_ours_from_hf(tiny.path, tiny.family)
    assert ours.args.rope_scaling.rope_type == SCALINGS[name][1]["rope_type"]
    with torch.no_grad():
        assert_rel_close(ours(tokens()), tiny.model(tokens()).logits, TOL, f"{name} logits vs transformers")
        # Without the scaling the logits differ, or the comparison above would prove nothing.
        plain = dataclasses.replace(ours.args, rope_scaling=None)
        unscaled = Decoder(plain).eval()
        unscaled.load_state_dict(ours.state_dict())
        assert (unscaled(tokens()) - ours(tokens())).abs().max() > 1e-3


def test_legacy_rope_scaling_and_rope_parameters_read_alike():
    base = dict(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=8,
                rms_norm_eps=1e-6, max_position_embeddings=128)
    new = {**base, "rope_parameters": {"rope_theta": 500.0, **YARN}}
    legacy = {**base, "rope_theta": 500.0, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}
    spec = get_model_spec("qwen2")
    assert args_from_hf_config(new, **spec.family_flags) == args_from_hf_config(legacy, **spec.family_flags)
    # transformers' defaults: the original length is max_position_embeddings, a null factor their ratio.
    assert rope_scaling_from_dict({"type": "yarn", "factor": None, "original_max_position_embeddings": 32}, 128).factor == 4.0
    assert rope_scaling_from_dict({"type": "yarn", "factor": 2}, 128) == RopeScaling("yarn", 2.0, 128)
    assert rope_scaling_from_dict({"rope_type": "default", "rope_theta": 1.0}, 128) is None


@pytest.mark.parametrize("entry,message", [
    ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic' is not supported"),
    ({"type": "longrope", "factor": 2.0}, "'longrope' is not supported"),
    ({"type": "yarn", "factor": 4.0, "beta_fast": "32"}, "beta_fast='32' must be a number"),
    ({"type": "linear", "factor": 2.0, "original_max_position_embeddings": 8}, "unknown keys"),
    ({"type": "linear"}, "needs factor >= 1"),
    ({"type": "yarn", "factor": 0.5}, "needs factor >= 1"),
])
def test_bad_rope_scaling_is_one_line(entry, message):
    with pytest.raises(ConfigError, match=message) as error:
        rope_scaling_from_dict(entry, 128)
    assert "\n" not in str(error.value)


def toml_job(tmp_path, model_lines: str, training_lines: str = "") -> list[str]:
    path = tmp_path / "job.toml"
    path.write_text(f'[model]\nname = "qwen3"\nflavor = "debugmodel"\n{model_lines}\n[training]\n{training_lines}\n')
    return ["--job.config_file", str(path)]


def test_toml_rope_scaling_overrides_the_flavor(tmp_path):
    job = parse_config(toml_job(tmp_path, 'rope_scaling = {type = "yarn", factor = 4.0, original_max_position_embeddings = 1024}'))
    _, args = model_spec_and_args(job)
    assert args.rope_scaling == RopeScaling("yarn", 4.0, 1024)
    assert get_model_spec("qwen3").flavors["debugmodel"].rope_scaling is None  # the shared flavor is untouched
    for bad, message in [('rope_scaling = {type = "dynamic", factor = 2.0}', "model.rope_scaling: rope scaling type 'dynamic'"),
                         ('rope_scaling = "yarn"', "model.rope_scaling='yarn' must be a table"),
                         ('rope_scaling = {type = "yarn", factor = nan}', "model.rope_scaling.factor=nan must be a finite number >= 1")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            model_spec_and_args(parse_config(toml_job(tmp_path, bad)))


def test_export_writes_the_scaling_back(tiny_scaled, tmp_path):
    """A default-RoPE HF model extended with YaRN in the TOML -> export -> transformers and our
    loader both read the YaRN model back: same logits, same args."""
    base = tiny_scaled("qwen3-linear").path  # its config.json's scaling is replaced by the TOML's
    job = parse_config(hf_folder_args(base) + [
        "--model.rope_scaling", "type", "yarn", "factor", "4.0", "original_max_position_embeddings", "32", "beta_fast", "16"])
    spec, args = model_spec_and_args(job)
    assert args.rope_scaling == RopeScaling("yarn", 4.0, 32, beta_fast=16.0)
    ours = Decoder(args)
    randomize_parameters(ours, seed=5)
    ours.eval()
    out = str(tmp_path / "export")
    export_hf(ours, spec, args, out, dtype="float32")
    assert spec.args_for(out) == args
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    assert reloaded.config.rope_parameters["rope_type"] == "yarn"
    with torch.no_grad():
        assert_rel_close(reloaded(tokens(1)).logits, ours(tokens(1)), TOL, "exported YaRN model in transformers")


# ---------------------------------------------------------------- dp2 / cp2 / tp2 vs transformers


def make_rollouts(seed: int) -> list[dict]:
    """Up to SEQ tokens each, so packed rows hold one long rollout or several short ones."""
    rng = random.Random(seed)
    lengths = [(60, 68), (10, 20), (30, 40), (5, 100), (20, 12)]
    return [{"prompt_ids": [rng.randrange(3, 500) for _ in range(p)], "response_ids": [rng.randrange(3, 500) for _ in range(r)],
             "advantage": 1.0} for p, r in lengths]


def transformers_logprobs(model, rollouts: list[dict]) -> list[list[float]]:
    out = []
    with torch.no_grad():
        for r in rollouts:
            ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
            logits = model(ids).logits[0, len(r["prompt_ids"]) - 1 : -1]
            out.append(logits.log_softmax(-1).gather(-1, torch.tensor(r["response_ids"])[:, None])[:, 0].tolist())
    return out


LAYOUTS = {"dp2": [], "cp2": ["--parallelism.context_parallel_degree", "2"], "tp2": ["--parallelism.tensor_parallel_degree", "2"]}
GROUP_CASES = ["qwen3-yarn", "qwen2-yarn-betas-untruncated", "qwen3-linear"]


def layout_logprobs(cases: dict[str, tuple[str, str]]) -> dict:
    """On both ranks: {case: compute_logprobs' {rollout: log-probs}} for (model dir, layout) cases."""
    results = {}
    for name, (model_dir, rollouts_path, layout) in cases.items():
        args = logprobs_script.config_args(model_dir, rollouts_path, ["--training.seq_len", str(SEQ), *LAYOUTS[layout],
                                                                       "--comm.init_timeout_seconds", "90"])
        job_config = parse_config(args)
        job = validate(job_config)
        rollouts = logprobs_script.read_jsonl(rollouts_path)
        mine = logprobs_script.compute_logprobs(job_config, job, rollouts, torch.device("cpu"))
        parts = [None] * dist.get_world_size()  # dp groups score different rows
        dist.all_gather_object(parts, mine)
        results[name] = {i: lp for part in parts for i, lp in part.items()}
    return results


def test_compute_logprobs_matches_transformers_under_dp2_cp2_tp2(tiny_scaled, tmp_path):
    rollouts = make_rollouts(seed=0)
    path = write_jsonl(tmp_path / "rollouts.jsonl", rollouts)
    cases = {f"{name} {layout}": (tiny_scaled(name).path, path, layout) for name in GROUP_CASES for layout in LAYOUTS}
    results = run_on_ranks(2, layout_logprobs, cases)
    for case, got in results.items():
        want = transformers_logprobs(tiny_scaled(case.split()[0]).model, rollouts)
        assert_logprobs_match(got, want, case)


# ---------------------------------------------------------------- staged context extension


def test_seq_len_schedule_checks_and_stages(tmp_path):
    """The schedule's refusals, on a config through parse_config (more in tests/test_config.py), then its stages."""
    def training(schedule, seq_len=128, *extra):
        return parse_config(toml_job(tmp_path, "", f"seq_len = {seq_len}\nseq_len_schedule = {schedule}") + list(extra)).training

    for schedule, message in [("[[1, 64], [4, 128]]", "start at 0"), ("[[0, 64], [4, 128], [4, 128]]", "increase"),
                              ("[[0, 64], [4, 100]]", "largest equals training.seq_len=128"),
                              ("[[0, 0], [4, 128]]", "lengths are >= 1"), ("[[0, 64, 3]]", "pairs"),
                              ("[0, 128]", "must be a list of lists of integers")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            training(schedule)
    # One stage more than dynamo's limit as it stands (a script imported elsewhere may have raised it).
    too_many = [[i, 128] for i in range(torch._dynamo.config.recompile_limit + 1)]
    with pytest.raises(ConfigError, match="torch.compile's recompile limit"):
        training(too_many, 128, "--compile.enable")
    staged = RowSchedule.from_training(training("[[0, 30], [3, 64], [5, 128]]"), multiple=4)  # tp2 x cp2
    assert [staged.at(step) for step in (1, 2, 3, 4, 5, 9)] == \
        [(30, 32), (30, 32), (64, 64), (64, 64), (128, 128), (128, 128)]
    assert staged.longest == (128, 128)


COMPILED_LENGTHS = []


@torch._dynamo.register_backend
def recording_eager(graph_module, example_inputs):
    """Records the sequence length of every graph compiled (the block input x [B, T, dim])."""
    COMPILED_LENGTHS.extend(t.shape[1] for t in example_inputs if isinstance(t, torch.Tensor) and t.ndim == 3)
    return graph_module.forward


def schedule_run(tmp_path, model_dir: str, extra=()) -> dict[int, float]:
    config = tmp_path / "schedule.toml"
    staged = {"seq_len = 256": "seq_len = 128\nseq_len_schedule = [[0, 32], [3, 64], [5, 128]]",  # the recipe's shape
              'hf_assets_path = "assets/debug"': 'hf_assets_path = "assets/debug"\nrope_scaling = ' + YARN_TOML}
    text = open("train_configs/debug.toml").read()
    for old, new in staged.items():
        text = text.replace(old, new)
    config.write_text(text)
    args = ["--job.config_file", str(config), "--job.dump_folder", str(tmp_path / "run"), "--training.steps", "6",
            "--model.flavor", model_dir, "--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0",
            "--training.local_batch_size", "2", "--metrics.log_freq", "1", "--metrics.no-enable-tensorboard",
            "--compile.enable", "--compile.backend", "recording_eager", *extra]
    with one_rank():
        job_config = parse_config(args)
        job = validate(job_config)
        _, records = train.train(job_config, job, torch.device("cpu"))
    return {r["step"]: r["loss"] for r in records}


def test_schedule_compiles_once_per_stage_and_resumes_exactly(hf_dir, tmp_path):
    torch._dynamo.reset()
    COMPILED_LENGTHS.clear()
    uninterrupted = schedule_run(tmp_path, hf_dir)
    per_stage = COMPILED_LENGTHS.count(32)
    assert per_stage >= 1 and COMPILED_LENGTHS == [32] * per_stage + [64] * per_stage + [128] * per_stage, COMPILED_LENGTHS
    # Rewound to the checkpoint of step 2 (first stage): steps 3-6 cross both boundaries again.
    resumed = schedule_run(tmp_path, hf_dir, ["--checkpoint.load_step", "2"])
    assert sorted(resumed) == [3, 4, 5, 6]
    assert resumed == {step: uninterrupted[step] for step in resumed}, (resumed, uninterrupted)
