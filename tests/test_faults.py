"""Faults end in one clear line or a recovery: train.py's loop under NaN, preemption, held-out
evaluation, profiling and memory snapshots.

- A step whose loss or grad norm is not finite is never applied nor saved: exit code 3 and one
  line, the newest (finite) checkpoint kept, also with async saves; training.skip_nonfinite_steps
  skips such batches (weights and LR schedule unchanged) and trains on. HF export refuses
  non-finite weights, naming the tensor.
- SIGTERM to a real `python train.py`: the step finishes, a checkpoint is saved, exit 0; the
  relaunch resumes bit-identically to an uninterrupted run, and metrics.jsonl never repeats a step.
- validation_loss under dp2 and cp2 equals one process; profiling writes trace files, and memory
  snapshots at their steps and at an out-of-memory;
  train.token_means averages over the global batch.

The debug model at seq_len 32 from its seeded random init (the same under every layout).
"""

import contextlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from longctx import profiling, train
from longctx.base import ConfigError
from longctx.checkpoint import manager as checkpoint
from longctx.checkpoint.dcp import complete_steps, latest_step, save_dcp_model
from longctx.config import parse_config
from longctx.launch import validate
from longctx.modeling import model_spec_and_args
from longctx.models.common.decoder import Decoder
from scripts import convert_dcp_to_hf
from tests.conftest import ROOT
from tests.distributed_harness import run_on_ranks
from tests.run_train_cases import run_case
from tests.test_checkpoint import convert
from tests.test_recipes import one_rank, rank_env

CONFIG = os.path.join(ROOT, "train_configs", "debug.toml")
# Constant LR (no warmup, no decay): a run's steps do not depend on training.steps, so a run
# preempted at an unknown step can be resumed and compared to a reference of any length.
CONSTANT_LR = ["--lr_scheduler.warmup_steps", "0", "--lr_scheduler.decay_ratio", "0"]


def args(dump, *extra, steps: int = 3, dp: int = 1) -> list[str]:
    return ["--job.config_file", CONFIG, "--job.dump_folder", str(dump), "--training.seq_len", "32",
            "--training.global_batch_size", "2", "--training.local_batch_size", str(2 // dp), "--training.steps", str(steps),
            "--metrics.log_freq", "1", "--metrics.no-enable-tensorboard", "--comm.init_timeout_seconds", "120",
            "--debug.deterministic", *extra]


def metrics(dump) -> list[dict]:
    with open(os.path.join(dump, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint_tensors(step_folder: str, tmp_path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP training checkpoint (model, optimizer, schedule, step), read in this process."""
    out = tmp_path / f"{os.path.basename(step_folder)}-{time.monotonic_ns()}.pt"
    dcp_to_torch_save(step_folder, out)
    state = torch.load(out, weights_only=False)
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", state)
    return flat


# ---------------------------------------------------------------- in this process (1 rank)


class NaNLossAt:
    """The run's recipe with a NaN loss at the given steps (one micro-batch a step); records the
    weights each step's forward sees."""

    def __init__(self, recipe, nan_steps: set[int]):
        self.recipe, self.nan_steps, self.weights_seen = recipe, nan_steps, []

    def __getattr__(self, name):
        return getattr(self.recipe, name)

    def loss_sum(self, model, batch, loss_chunk):
        self.weights_seen.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
        loss, sums = self.recipe.loss_sum(model, batch, loss_chunk)
        return (loss * math.nan if len(self.weights_seen) in self.nan_steps else loss), sums


def train_with_nan(argv: list[str], nan_steps: set[int]):
    job_config = parse_config(argv)
    job = validate(job_config)
    recipe = NaNLossAt(job.recipe, nan_steps)
    with one_rank():
        _, records = train.train(job_config, job._replace(recipe=recipe), torch.device("cpu"))
    return records, recipe.weights_seen


@pytest.mark.parametrize("implementation", ["foreach", "fused"])  # fused: skipped on the device (found_inf)
def test_nonfinite_step_is_skipped_within_budget(tmp_path, implementation):
    records, seen = train_with_nan(args(tmp_path, "--training.skip_nonfinite_steps", "1", "--optimizer.implementation",
                                        implementation, "--checkpoint.enable", "--checkpoint.interval", "3"), {2})
    assert [r["skipped_steps"] for r in records] == [0, 1, 1]
    assert math.isnan(records[1]["loss"]) and all(math.isfinite(records[i]["loss"]) for i in (0, 2))
    assert records[0]["lr"] == records[1]["lr"] < records[2]["lr"], "the LR schedule moved at the skipped step"
    assert not torch.equal(seen[1], seen[0]), "step 1 was applied"
    assert torch.equal(seen[2], seen[1]), "the NaN step 2 changed the weights"
    saved = checkpoint_tensors(str(tmp_path / "checkpoint" / "step-3"), tmp_path)
    steps = {v.item() for k, v in saved.items() if k.startswith("optimizer.") and k.endswith(".step")}
    assert steps == {2.0}, f"AdamW's step counts {steps} after 2 applied steps of 3"
    assert all(v.isfinite().all() for k, v in saved.items() if v.is_floating_point()), "a NaN reached the saved state"


def test_garbage_is_collected_every_gc_freq_steps_only(tmp_path, monkeypatch):
    collected, enabled_in_loop = [], []
    real_collect = train.gc.collect

    def collect(generation=2):
        collected.append(generation)
        enabled_in_loop.append(train.gc.isenabled())
        return real_collect(generation)

    monkeypatch.setattr(train.gc, "collect", collect)
    train_with_nan(args(tmp_path, "--training.gc_freq", "2", steps=5), set())
    assert collected == [1, 1, 1], "one young collection on entry, then at steps 2 and 4"
    assert not any(enabled_in_loop) and train.gc.isenabled(), "automatic collection is off in the loop only"


def test_nonfinite_step_stops_the_run_and_is_not_saved(tmp_path):
    with pytest.raises(train.NonFiniteError, match=r"^step 2: loss is nan; .*skip_nonfinite_steps=0"):
        train_with_nan(args(tmp_path, "--checkpoint.enable", "--checkpoint.interval", "1"), {2})
    assert latest_step(str(tmp_path / "checkpoint")) == 1
    assert [r["step"] for r in metrics(tmp_path)] == [1]


def test_async_with_pinned_mem_saves_every_interval(tmp_path, monkeypatch):
    """torch 2.11's DefaultStager closes its deep copier after each stage (pytorch#170431), so a
    second save staged with the same stager died with KeyError: <class 'type'>.
    That torch is emulated on the installed one, whose stager stays open; staging as on a GPU (a
    thread, shared memory, an upload process) but without pinning or CUDA copies."""
    stage = DefaultStager._stage

    def stage_then_close(self, state_dict, **kwargs):  # torch 2.11's DefaultStager._stage
        staged = stage(self, state_dict, **kwargs)
        self._state_dict_stager.close()
        return staged

    monkeypatch.setattr(DefaultStager, "_stage", stage_then_close)
    monkeypatch.setattr(checkpoint, "PINNED_STAGING", StagingOptions(False, True, True, False))
    checkpoint._stager_closes_itself.cache_clear()
    try:
        job_config = parse_config(args(tmp_path, "--checkpoint.enable", "--checkpoint.interval", "1",
                                       "--checkpoint.async_mode", "async_with_pinned_mem"))
        job = validate(job_config)
        with one_rank():
            train.train(job_config, job, torch.device("cpu"))
    finally:
        checkpoint._stager_closes_itself.cache_clear()  # the next test sees the installed torch again
    assert complete_steps(str(tmp_path / "checkpoint")) == [1, 2, 3]


def test_export_refuses_nonfinite_weights(tmp_path, capfd):
    """A NaN checkpoint (as an older version could save) is not exported: one line naming the tensor."""
    job_config = parse_config(["--job.config_file", CONFIG])
    _, model_args = model_spec_and_args(job_config)
    model = Decoder(model_args)
    model.init_weights(seed=0)
    with torch.no_grad():
        model.layers["1"].attention.wo.weight[0, 0] = math.inf
    save_dcp_model(model, str(tmp_path / "dcp"))
    with pytest.raises(SystemExit) as exit_info:
        convert(convert_dcp_to_hf, [str(tmp_path / "dcp"), str(tmp_path / "hf"), "--job.config_file", CONFIG])
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: model.layers.1.self_attn.o_proj.weight holds NaN or inf"), lines[0]
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------- validation, profiling, token_means


@pytest.mark.parametrize("extra, message", [
    (["--training.skip_nonfinite_steps", "-1"], "training.skip_nonfinite_steps=-1 must be >= 0"),
    (["--validation.enable"], "validation.dataset_path=None must be a file or folder of held-out documents"),
    (["--validation.enable", "--validation.dataset_path", CONFIG, "--validation.steps", "-1"], "validation.steps=-1 must be >= 1"),
    (["--profiling.enable_profiling", "--profiling.profile_freq", "2"],
     "profiling.profile_freq=2 must be >= profiler_warmup + profiler_active = 3 + 1"),
])
def test_bad_values_are_refused_before_the_run(extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(parse_config(["--job.config_file", CONFIG, *extra]))


def test_memory_snapshots_every_profile_freq_steps_and_on_out_of_memory(tmp_path, monkeypatch):
    """The allocator's history is recorded from the loop's start, dumped every profile_freq training
    steps (counted on from a resumed step) and at an out-of-memory, then no longer recorded. CUDA's
    recorder and dump stand in for themselves: this machine may have no GPU."""
    recording = []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda enabled="all", **_: recording.append(enabled))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", lambda filename: open(filename, "wb").close())
    job_config = parse_config(args(tmp_path, "--profiling.profile_freq", "2"))
    job_config.profiling.enable_memory_snapshot = True  # past the config's refusal without CUDA
    with one_rank(), pytest.raises(torch.OutOfMemoryError):
        with profiling.profilers(job_config, start_step=1) as profiler:
            for _ in range(4):  # steps 2 to 5
                profiler.step()
            raise torch.OutOfMemoryError("CUDA out of memory")  # at step 6
    folder = tmp_path / "memory_snapshot"
    dumps = sorted(str(path.relative_to(folder)) for path in folder.rglob("*.pickle"))
    assert dumps == [f"{name}/rank0_memory_snapshot.pickle" for name in ("iteration_2", "iteration_4", "iteration_5_exit")]
    assert recording == ["all", None]


def held_out(tmp_path) -> str:
    path = tmp_path / "held_out.jsonl"
    with open(os.path.join(ROOT, "assets", "debug", "corpus.jsonl")) as f:
        path.write_text("".join(f.readlines()[-20:]))
    return str(path)


def validation_args(dump, held_out_path: str, dp: int = 1, cp: int = 1) -> list[str]:
    return args(dump, "--validation.enable", "--validation.dataset_path", held_out_path, "--validation.freq", "1",
                "--validation.steps", "2", "--validation.local_batch_size", str(2 // dp), "--validation.seq_len", "24",
                "--parallelism.data_parallel_shard_degree", str(dp), "--parallelism.context_parallel_degree", str(cp),
                steps=2, dp=dp)


def two_rank_cases(tmp: str, held_out_path: str) -> dict:
    """On both ranks of one process group: token_means, and validation_loss under dp2 and cp2."""
    rank = dist.get_rank()
    sums = {"clip_fraction": torch.tensor(rank + 1.0), "ratio": torch.tensor(2.0 * (rank + 1))}
    out = {"token_means": train.token_means(sums, torch.tensor(6.0), dist.group.WORLD),
           "token_means_empty": train.token_means({}, torch.tensor(6.0), dist.group.WORLD)}
    for name, layout in (("dp2", dict(dp=2)), ("cp2", dict(cp=2))):
        job_config = parse_config(validation_args(os.path.join(tmp, name), held_out_path, **layout))
        job = validate(job_config)
        _, records = train.train(job_config, job, torch.device("cpu"))
        out[name] = [r["validation_loss"] for r in records]
    return out


@pytest.mark.slow
def test_validation_loss_under_two_ranks_equals_one_process_and_profiling_writes_traces(tmp_path):
    held_out_path = held_out(tmp_path)
    profile = ["--profiling.enable_profiling", "--profiling.profile_freq", "1", "--profiling.profiler_warmup", "0"]
    job_config = parse_config(validation_args(tmp_path / "one", held_out_path) + profile)
    job = validate(job_config)
    with one_rank():
        _, records = train.train(job_config, job, torch.device("cpu"))
    reference = [r["validation_loss"] for r in records]
    assert len(reference) == 2 and reference[1] < reference[0], reference
    assert [r["step"] for r in metrics(tmp_path / "one")] == [1, 2]
    assert [r["validation_loss"] for r in metrics(tmp_path / "one")] == reference
    for step in (1, 2):
        trace = tmp_path / "one" / "profile_traces" / f"iteration_{step}" / "rank0_trace.json"
        assert "traceEvents" in json.loads(trace.read_text()), trace

    got = run_on_ranks(2, two_rank_cases, str(tmp_path), held_out_path)
    assert got["token_means"] == pytest.approx({"clip_fraction": 0.5, "ratio": 1.0}) and got["token_means_empty"] == {}
    for layout in ("dp2", "cp2"):
        assert got[layout] == pytest.approx(reference, rel=1e-5), f"{layout}: {got[layout]} vs one process {reference}"


# ---------------------------------------------------------------- real processes: NaN, SIGTERM, resume


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """`python train.py` for 1000 steps, SIGTERM once it has logged a step: (result, dump, step it stopped at)."""
    dump = tmp_path_factory.mktemp("preempted")
    command = [sys.executable, "train.py", *args(dump, "--checkpoint.enable", "--checkpoint.interval", "1000",
                                                  *CONSTANT_LR, steps=1000)]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (os.path.exists(dump / "metrics.jsonl") and metrics(dump)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    result = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    return result, dump, latest_step(str(dump / "checkpoint"))


@pytest.fixture(scope="module")
def runs(preempted, tmp_path_factory):
    """train.py's `__main__` in this process (tests/run_train_cases.py), for: a diverging run (lr 1e3,
    async saves every step, keep_latest_k 2), the preempted run relaunched to 2 steps past its stop,
    and an uninterrupted reference of that length."""
    _, preempted_dump, stopped = preempted
    tmp = tmp_path_factory.mktemp("runs")
    assert stopped is not None, "the preempted run saved no checkpoint"
    with open(preempted_dump / "metrics.jsonl", "a") as f:  # as a run killed after logging a step it never saved
        f.write(json.dumps({"step": stopped + 1, "loss": 0.0}) + '\n{"step": ')
    cases = {
        "diverging": args(tmp / "diverging", "--optimizer.lr", "1e3", "--checkpoint.enable", "--checkpoint.interval", "1",
                          "--checkpoint.keep_latest_k", "2", "--checkpoint.async_mode", "async", steps=12),
        "resumed": args(preempted_dump, "--checkpoint.enable", "--checkpoint.interval", "1000", *CONSTANT_LR, steps=stopped + 2),
        "reference": args(tmp / "reference", "--checkpoint.enable", "--checkpoint.interval", "1000", *CONSTANT_LR,
                          steps=stopped + 2),
    }
    results = {}
    for name, argv in cases.items():
        with rank_env(), contextlib.redirect_stderr(io.StringIO()) as python_stderr:  # pytest's sys.stderr is not fd 2
            results[name] = run_case(argv)
        results[name]["stderr"] += python_stderr.getvalue()
    return results, tmp


@pytest.mark.slow
def test_diverging_run_exits_3_and_keeps_its_finite_checkpoints(runs, tmp_path):
    results, tmp = runs
    result, dump = results["diverging"], tmp / "diverging"
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert result["returncode"] == 3 and len(lines) == 1, result
    words = lines[0].split()
    assert words[:2] == ["error:", "step"] and words[3] in ("loss", "grad_norm") and words[5] in ("nan;", "inf;"), lines[0]
    failed = int(words[2].rstrip(":"))
    checkpoints = str(dump / "checkpoint")
    assert latest_step(checkpoints) == failed - 1 and not os.path.exists(os.path.join(checkpoints, f"step-{failed}"))
    for name, tensor in checkpoint_tensors(os.path.join(checkpoints, f"step-{failed - 1}"), tmp_path).items():
        assert tensor.dtype == torch.int64 or torch.isfinite(tensor).all(), name
    assert [r["step"] for r in metrics(dump)] == list(range(1, failed))


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_resumes_bit_identically(preempted, runs, tmp_path):
    result, dump, stopped = preempted
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"stopped by SIGTERM after step {stopped} of 1000: checkpoint {dump}/checkpoint/step-{stopped} saved" in result.stdout
    results, tmp = runs
    assert results["resumed"]["returncode"] == 0 and results["reference"]["returncode"] == 0, results
    resumed, reference = metrics(dump), metrics(tmp / "reference")
    assert [r["step"] for r in resumed] == list(range(1, stopped + 3)), "a step logged twice or missing"
    keys = ("loss", "grad_norm", "lr", "valid_tokens")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in reference]
    last = f"step-{stopped + 2}"
    ours = checkpoint_tensors(str(dump / "checkpoint" / last), tmp_path)
    theirs = checkpoint_tensors(str(tmp / "reference" / "checkpoint" / last), tmp_path)
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
