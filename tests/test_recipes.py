"""SFT and policy recipes on CPU, their tools and the launch script.

- SFT: the loss under cp2 and tp2 equals 1 rank (rendering and labels: tests/test_chat_template.py).
- Policy: per-token log-probs under cp2, tp2 and dp2 x cp2 equal 1 rank; the loss, clip fraction
  and gradients equal a direct computation with full logits from `transformers`; the importance
  ratio is 1 at the first step when the old log-probs come from the same weights.
- scripts/run_train.sh trains the debug config on 2 CPU ranks.

Every layout starts from one tiny random HF Qwen3. The 2-rank cases share one process group
(tests/distributed_harness.py); 1-rank references run in this process.
"""

import contextlib
import io
import json
import math
import os
import random
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from longctx import train
from longctx.base import IGNORE_INDEX, DataError
from longctx.checkpoint.source import weight_source
from longctx.config import parse_config
from longctx.data.loader import RowLength
from longctx.data.packing import PackedStream, collate, pack_row
from longctx.launch import free_port, validate
from longctx.modeling import build_model
from longctx.recipes import build_recipe
from longctx.recipes.policy import EXTRA_FIELDS
from scripts import compute_logprobs as logprobs_script
from tests.conftest import ROOT
from tests.distributed_harness import run_on_ranks

ATOL = 1e-5
COMMON = ["--metrics.log_freq", "1", "--metrics.no-enable-tensorboard", "--comm.init_timeout_seconds", "120"]


@contextlib.contextmanager
def rank_env():
    """The environment torchrun gives a 1-process job (on a free port), restored afterwards."""
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@contextlib.contextmanager
def one_rank():
    """A 1-process gloo group in this process, as train.main would make."""
    with rank_env(), contextlib.redirect_stdout(io.StringIO()):
        dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=60))
        try:
            yield
        finally:
            dist.destroy_process_group()


def layout_args(cp: int = 1, tp: int = 1, ulysses: int = -1) -> list[str]:
    """ulysses 1: cp as a pure sequence shard (head-tail chunks), -1: the automatic split."""
    return ["--parallelism.context_parallel_degree", str(cp), "--parallelism.tensor_parallel_degree", str(tp),
            "--parallelism.data_parallel_shard_degree", "-1", "--parallelism.context_parallel_ulysses_degree", str(ulysses)]


def sft_args(hf_dir: str, dump: str, **layout) -> list[str]:
    return ["--job.config_file", "train_configs/debug_sft.toml", "--job.dump_folder", dump,
            "--model.flavor", hf_dir, "--checkpoint.initial_load_path", hf_dir, "--checkpoint.initial_load_in_hf",
            "--training.seq_len", "128", "--training.steps", "2", "--training.local_batch_size", "2",
            "--lr_scheduler.warmup_steps", "1", *COMMON, *layout_args(**layout)]


def policy_args(hf_dir: str, rollouts: str, **layout) -> list[str]:
    """compute_logprobs' job config: the policy recipe on `rollouts` with the HF model."""
    return logprobs_script.config_args(hf_dir, rollouts, ["--training.seq_len", "64", *COMMON, *layout_args(**layout)])


def train_records(args: list[str]) -> list[dict]:
    job_config = parse_config(args)
    job = validate(job_config)
    _, records = train.train(job_config, job, torch.device("cpu"))
    return records


def layout_logprobs(args: list[str], rollouts_path: str) -> dict[int, list[float]]:
    job_config = parse_config(args)
    job = validate(job_config)
    rollouts = logprobs_script.read_jsonl(rollouts_path)
    return logprobs_script.compute_logprobs(job_config, job, rollouts, torch.device("cpu"))


def two_rank_cases(hf_dir: str, tmp: str, rollouts: str, rollouts_with_old: str) -> dict:
    """Runs on both ranks of one process group: every 2-rank case of this file."""
    out = {}
    for name, layout in (("cp2", dict(cp=2)), ("tp2", dict(tp=2))):
        out[f"sft_{name}"] = train_records(sft_args(hf_dir, os.path.join(tmp, f"sft_{name}"), **layout))
        out[f"logprobs_{name}"] = layout_logprobs(policy_args(hf_dir, rollouts, **layout), rollouts)
    policy_train = policy_args(hf_dir, rollouts_with_old, cp=2, ulysses=1) + [
        "--job.dump_folder", os.path.join(tmp, "policy_cp2"), "--training.steps", "1", "--training.local_batch_size", "4"]
    out["policy_cp2"] = train_records(policy_train)
    return out


# ---------------------------------------------------------------- fixtures


def make_rollouts(n: int, seed: int, with_old: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rollouts = []
    for _ in range(n):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randint(1, 20))]
        response = [rng.randrange(3, 500) for _ in range(rng.randint(1, 24))]
        rollout = {"prompt_ids": prompt, "response_ids": response, "advantage": rng.uniform(-1, 1)}
        if with_old:  # near log(1/512) = -6.24, so that some ratios leave [0.8, 1.2]
            rollout["old_logprobs"] = [-6.24 + rng.uniform(-0.4, 0.4) for _ in response]
        rollouts.append(rollout)
    return rollouts


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


@pytest.fixture(scope="module")
def rollouts_path(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("rollouts") / "rollouts.jsonl", make_rollouts(12, seed=0))


@pytest.fixture(scope="module")
def reference_logprobs(hf_dir, rollouts_path, tmp_path_factory):
    """1 rank, through the script's own main: [per rollout: response log-probs]."""
    out = str(tmp_path_factory.mktemp("logprobs") / "out.jsonl")
    with rank_env(), contextlib.redirect_stdout(io.StringIO()):
        logprobs_script.main(["--model-dir", hf_dir, "--input", rollouts_path, "--output", out,
                              "--training.seq_len", "64", *COMMON])
    records = logprobs_script.read_jsonl(out)
    assert [{k: v for k, v in r.items() if k != "response_logprobs"} for r in records] == logprobs_script.read_jsonl(rollouts_path)
    return [r["response_logprobs"] for r in records]


@pytest.fixture(scope="module")
def two_ranks(hf_dir, rollouts_path, reference_logprobs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_ranks")
    with_old = [dict(r, old_logprobs=lp) for r, lp in zip(logprobs_script.read_jsonl(rollouts_path), reference_logprobs)]
    return run_on_ranks(2, two_rank_cases, hf_dir, str(tmp), rollouts_path, write_jsonl(tmp / "with_old.jsonl", with_old))


def assert_logprobs_match(got: dict[int, list[float]] | list, want: list[list[float]], label: str):
    got = [got[i] for i in range(len(want))]
    assert [len(g) for g in got] == [len(w) for w in want], f"{label}: response lengths differ"
    diff = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w))
    assert diff <= ATOL, f"{label}: max |logprob diff| {diff:.2e} > {ATOL:.0e}"


# ---------------------------------------------------------------- SFT


@pytest.fixture(scope="module")
def sft_reference(hf_dir, tmp_path_factory):
    with one_rank():
        return train_records(sft_args(hf_dir, str(tmp_path_factory.mktemp("sft_1"))))


@pytest.mark.parametrize("layout", ["cp2", "tp2"])
def test_sft_loss_matches_one_rank(layout, sft_reference, two_ranks):
    want = [r["loss"] for r in sft_reference]
    got = [r["loss"] for r in two_ranks[f"sft_{layout}"]]
    assert len(got) == len(want) == 2
    assert sft_reference[0]["valid_tokens"] == two_ranks[f"sft_{layout}"][0]["valid_tokens"]
    for step, (g, w) in enumerate(zip(got, want), 1):
        assert abs(g - w) <= 1e-5 * abs(w), f"{layout} step {step}: loss {g} vs 1 rank {w}"


# ---------------------------------------------------------------- policy


def test_policy_encode_aligns_labels_advantages_and_old_logprobs(hf_dir, rollouts_path):
    recipe = build_recipe(parse_config(policy_args(hf_dir, rollouts_path)))
    tokens, labels, advantages, old = recipe.encode(
        {"prompt_ids": [5, 6, 7], "response_ids": [8, 9], "advantage": 0.5, "old_logprobs": [-1.0, -2.0]})
    assert tokens == [5, 6, 7, 8, 9]
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, 8, 9, IGNORE_INDEX]  # position i predicts token i+1
    assert advantages == [0.0, 0.0, 0.5, 0.5, 0.0]
    assert old == [0.0, 0.0, -1.0, -2.0, 0.0]
    *_, old = recipe.encode({"prompt_ids": [5], "response_ids": [8], "advantage": 1.0})
    assert math.isnan(old[0])  # no old log-probs: the recipe uses the current ones (ratio 1)
    with pytest.raises(DataError, match="1 old_logprobs for 2 response tokens"):
        recipe.encode({"prompt_ids": [5], "response_ids": [8, 9], "advantage": 1.0, "old_logprobs": [-1.0]})


def test_policy_packs_rollouts_whole(hf_dir, rollouts_path):
    recipe = build_recipe(parse_config(policy_args(hf_dir, rollouts_path)))
    docs = [{"prompt_ids": [1] * 30, "response_ids": [2] * 20, "advantage": 1.0}] * 2  # 50 tokens each
    stream = PackedStream(docs, recipe.encode, 0, EXTRA_FIELDS, split_documents=False)
    row = stream.next_rows(1, [0], RowLength(64, 64))[0]
    assert (row["document_ids"][:50] == 0).all() and (row["document_ids"][50:] == 1).all()  # one rollout + padding
    assert (row["advantages"][29:49] == 1.0).all() and row["advantages"].sum() == 20


@pytest.mark.parametrize("layout", ["cp2", "tp2"])
def test_policy_logprobs_match_one_rank(layout, reference_logprobs, two_ranks):
    assert_logprobs_match(two_ranks[f"logprobs_{layout}"], reference_logprobs, layout)


def test_policy_logprobs_dp2_cp2_script(hf_dir, rollouts_path, reference_logprobs, tmp_path):
    """The script itself under torchrun: 4 ranks, two dp groups score different rows; cp as a
    sequence shard, so each row's log-probs come back from head-tail chunks."""
    out = str(tmp_path / "out.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           "scripts/compute_logprobs.py", "--model-dir", hf_dir, "--input", rollouts_path, "--output", out,
           "--training.seq_len", "64", "--comm.init_timeout_seconds", "120", *layout_args(cp=2, ulysses=1)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_logprobs_match([r["response_logprobs"] for r in logprobs_script.read_jsonl(out)], reference_logprobs, "dp2xcp2")


def test_policy_loss_and_grads_match_direct_computation(hf_dir, tmp_path):
    """Packed rollouts, chunked log-probs and the clipped loss against `transformers` on each
    rollout alone with its full logits; old log-probs chosen so that some ratios are clipped."""
    from transformers import Qwen3ForCausalLM

    rollouts = make_rollouts(6, seed=1, with_old=True)
    path = write_jsonl(tmp_path / "rollouts.jsonl", rollouts)
    job_config = parse_config(policy_args(hf_dir, path) + ["--training.seq_len", "256", "--recipe.loss_chunk_size", "32"])
    with one_rank():
        job = validate(job_config)
        spec, model_args, parallel_dims, recipe, settings = job.spec, job.model_args, job.parallel_dims, job.recipe, job.settings
        model = build_model(spec, model_args, parallel_dims, settings, torch.device("cpu"), weight_source(job_config))
    batch = collate([pack_row([recipe.encode(r) for r in rollouts], 256, recipe.pad_id, EXTRA_FIELDS)])
    loss_sum, metric_sums = recipe.loss_sum(model, batch, settings.loss_chunk)
    n_tokens = (batch["labels"] != IGNORE_INDEX).sum()
    (loss_sum / n_tokens).backward()
    grads = spec.state_dict_adapter(model_args).to_hf({n: p.grad for n, p in model.named_parameters()})

    hf = Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    eps, total, clipped, count = job_config.recipe.clip_eps, 0.0, 0, 0
    for r in rollouts:
        ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
        logp_all = torch.log_softmax(hf(ids).logits[0].float(), dim=-1)  # [L, V]
        start, response = len(r["prompt_ids"]) - 1, torch.tensor(r["response_ids"])
        logp = logp_all[start : start + len(response)].gather(1, response[:, None]).squeeze(1)
        ratio = torch.exp(logp - torch.tensor(r["old_logprobs"]))
        unclipped, clip = ratio * r["advantage"], ratio.clamp(1 - eps, 1 + eps) * r["advantage"]
        total = total - torch.minimum(unclipped, clip).sum()
        clipped += int((clip < unclipped).sum())
        count += len(response)
    (total / count).backward()

    assert int(n_tokens) == count
    assert abs(loss_sum.item() / count - total.item() / count) <= 1e-5 * abs(total.item() / count)
    assert 0 < clipped < count and int(metric_sums["clip_fraction"]) == clipped
    for name, p in hf.named_parameters():
        err = ((grads[name] - p.grad).norm() / p.grad.norm()).item()
        assert err <= 1e-5, f"{name}: gradient relative error {err:.2e}"


def test_policy_ratio_is_one_at_first_step(two_ranks, hf_dir, rollouts_path):
    """cp2 (sequence shard) training on rollouts whose old_logprobs the 1-rank script computed from the same weights:
    ratio 1 and no clipping, so the loss is minus the token mean of the advantages."""
    (step1,) = two_ranks["policy_cp2"]
    assert abs(step1["ratio_mean"] - 1) <= ATOL, step1
    assert step1["clip_fraction"] == 0.0, step1
    stream = build_recipe(parse_config(policy_args(hf_dir, rollouts_path))).build_stream()
    batch = collate(stream.next_rows(4, range(4), RowLength(64, 64)))  # the step's global batch
    mask = batch["labels"] != IGNORE_INDEX
    want = -(batch["advantages"] * mask).sum().item() / mask.sum().item()
    assert step1["valid_tokens"] == mask.sum().item()
    assert abs(step1["loss"] - want) <= ATOL, f"loss {step1['loss']} vs -mean advantage {want}"


# ---------------------------------------------------------------- launch


def test_run_train_sh_debug_config_two_ranks(tmp_path):
    env = dict(os.environ, NGPU="2", CONFIG_FILE="train_configs/debug.toml", OMP_NUM_THREADS="1")
    cmd = ["bash", "scripts/run_train.sh", "--training.steps", "2", "--training.seq_len", "64",
           "--job.dump_folder", str(tmp_path), *COMMON]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    assert "eta" in result.stdout
