"""Where two features meet, a new user's way: each case the way the README says it behaves.

- Preemption through the launcher: SIGTERM to scripts/run_train.sh or SIGINT to its whole process
  group (Slurm, Ctrl-C) -> the workers save, one stop line, exit 0, no traceback, and the resumed
  run is bit-identical to an uninterrupted one; a failed run still exits non-zero.
- Each script's own flags and output paths, and the profiler's folders, refused before any work
  with one line naming the flag or key.
- A damaged token folder is refused when opened, naming the damaged file.
"""

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from longctx import profiling
from longctx.base import ConfigError, DataError
from longctx.checkpoint.dcp import latest_step
from longctx.config import parse_config
from longctx.data.tokenize_corpus import tokenize_corpus as tokenize
from longctx.launch import run, validate
from longctx.recipes import build_recipe
from longctx.train import main as train_main
from scripts import compute_logprobs, convert_dcp_to_hf, convert_hf_to_dcp, plan, show_sft, tokenize_corpus
from tests.conftest import ROOT
from tests.test_faults import CONSTANT_LR, args, metrics
from tests.test_faults_torchrun import assert_same_steps, environment

DEBUG = "train_configs/debug.toml"
ASSETS = os.path.join(ROOT, "assets", "debug")


# ---- 1. preemption through the launcher ------------------------------------------------------------

def launcher_args(dump, *extra, steps: int) -> list[str]:
    """tests/test_faults' arguments for 2 ranks, less --job.config_file (the launcher's CONFIG_FILE)."""
    return args(dump, "--checkpoint.enable", "--checkpoint.interval", "1000", *CONSTANT_LR, *extra, steps=steps, dp=2)[2:]


def run_train_sh(argv: list[str], ngpu: int = 2) -> subprocess.Popen:
    """scripts/run_train.sh in a session of its own: its process group is the launcher's, as under Slurm."""
    env = dict(environment("gloo"), NGPU=str(ngpu), CONFIG_FILE=DEBUG, OMP_NUM_THREADS="1")
    return subprocess.Popen(["bash", "scripts/run_train.sh", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def preempt(dump, send) -> tuple[subprocess.Popen, str, str]:
    """A 1000-step run on 2 ranks, sent a signal by send(process) once it has logged step 2."""
    proc = run_train_sh(launcher_args(dump, steps=1000))
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if os.path.exists(dump / "metrics.jsonl") and len(metrics(dump)) >= 2:
            break
        time.sleep(0.05)
    send(proc)
    stdout, stderr = proc.communicate(timeout=300)
    return proc, stdout, stderr


def assert_preempted(proc, stdout: str, stderr: str, dump, signal_name: str) -> int:
    """Exit 0, one stop line naming the saved step, no traceback; returns the step."""
    stopped = latest_step(str(dump / "checkpoint"))
    assert proc.returncode == 0 and stopped is not None, stderr[-3000:]
    lines = [line for line in stdout.splitlines() if line.startswith("stopped by")]
    assert lines == [f"stopped by {signal_name} after step {stopped} of 1000: checkpoint {dump}/checkpoint/step-{stopped} "
                     "saved; the same command resumes from it"], stdout[-3000:]
    assert "Traceback" not in stderr and "SignalException" not in stderr, stderr[-3000:]
    return stopped


@pytest.mark.slow
def test_launcher_preempted_exits_0_and_resumes_bit_identically(tmp_path):
    term = tmp_path / "sigterm"
    stopped = assert_preempted(*preempt(term, lambda p: p.send_signal(signal.SIGTERM)), term, "SIGTERM")
    group = tmp_path / "sigint"  # Ctrl-C, or Slurm signalling every process: torchrun gets it too
    assert_preempted(*preempt(group, lambda p: os.killpg(p.pid, signal.SIGINT)), group, "SIGINT")

    last, reference = stopped + 2, tmp_path / "reference"
    for dump in (term, reference):
        proc = run_train_sh(launcher_args(dump, steps=last))
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        if dump == term:  # a fresh start would match the reference too
            assert f"resuming from the run's own checkpoint {term}/checkpoint/step-{stopped}" in stdout
    assert_same_steps(term, reference, last, tmp_path)


@pytest.mark.slow
def test_launcher_failed_run_exits_non_zero(tmp_path):
    proc = run_train_sh(launcher_args(tmp_path, "--training.steps", "0", steps=1), ngpu=1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "error: training.steps=0" in stderr, stderr[-3000:]


# ---- 2. each script's own flags and output paths ---------------------------------------------------

def script_refusals(tmp) -> list[tuple]:
    """(script main, arguments, what the one line must start with): none of them reads its input."""
    tmp.joinpath("a_file").write_text("x")
    a_file, missing, folder = str(tmp / "a_file"), str(tmp / "missing" / "out"), str(tmp)
    corpus = ["--input", str(tmp / "never_read.jsonl")]
    sft = ["--job.config_file", "train_configs/debug_sft.toml"]
    plan_config = ["--job.config_file", "train_configs/qwen3_bench.toml"]
    return [
        (tokenize_corpus.main, [*corpus, "--output", str(tmp / "t"), "--workers", "0"], "--workers 0 must be >= 1"),
        (tokenize_corpus.main, [*corpus, "--output", str(tmp / "t"), "--shard-tokens", "0"], "--shard-tokens 0 must be >= 1"),
        (tokenize_corpus.main, [*corpus, "--output", a_file], f"--output '{a_file}' is a file"),
        (tokenize_corpus.main, [*corpus, "--output", missing], f"--output '{missing}' is in '{tmp}/missing', which is not"),
        (plan.main, [*plan_config, "--ngpu", "0"], "--ngpu 0 must be >= 1"),
        (plan.main, [*plan_config, "--gpus-per-host", "0"], "--gpus-per-host 0 must be >= 1"),
        (plan.main, [*plan_config, "--gpu-mem-gib", "-1"], "--gpu-mem-gib -1 must be a positive number of GiB"),
        (plan.main, [*plan_config, "--host-mem-gib", "nan"], "--host-mem-gib nan must be a positive number of GiB"),
        (show_sft.main, [*sft, "--output", str(tmp / "o.jsonl"), "--limit", "-1"], "--limit -1 must be >= 0"),
        (show_sft.main, [*sft, "--output", str(tmp / "o.jsonl"), "--print", "-1"], "--print -1 must be >= 0"),
        (show_sft.main, [*sft, "--output", folder], f"--output '{folder}' is a folder"),
        (show_sft.main, [*sft, "--output", missing], f"--output '{missing}' is in '{tmp}/missing', which is not"),
        (compute_logprobs.main, ["--model-dir", folder, *corpus, "--output", folder], f"--output '{folder}' is a folder"),
        (convert_hf_to_dcp.main, [folder, missing], f"DCP_DIR '{missing}' is in '{tmp}/missing', which is not"),
        (convert_dcp_to_hf.main, [folder, missing, "--job.config_file", DEBUG], f"HF_DIR '{missing}' is in '{tmp}/missing'"),
    ]


def test_script_flags_and_outputs_are_refused_first_in_one_line(tmp_path, capsys):
    for main, argv, line in script_refusals(tmp_path):
        assert run(main, argv) == 2, (main.__module__, argv)
        errors = capsys.readouterr().err.splitlines()
        assert len(errors) == 1 and errors[0].startswith(f"error: {line}"), (main.__module__, errors)
    assert not os.path.exists(tmp_path / "missing") and not os.path.exists(tmp_path / "o.jsonl")


@pytest.mark.parametrize("key", ["save_traces_folder", "save_memory_snapshot_folder"])
def test_profiler_folder_that_is_a_file_is_refused_before_step_1(tmp_path, key):
    (tmp_path / "taken").write_text("a file where the profiler writes its folder")
    enable = "enable_profiling" if key == "save_traces_folder" else "enable_memory_snapshot"
    job_config = parse_config(["--job.config_file", DEBUG, "--job.dump_folder", str(tmp_path),
                               f"--profiling.{enable}", f"--profiling.{key}", "taken/inner"])
    with pytest.raises(ConfigError, match=f"profiling.{key}='taken/inner': {tmp_path}/taken is a file"):
        profiling.check_folders(job_config)
    if key == "save_traces_folder":  # the whole check, as train.py's main runs it (snapshots need CUDA first)
        with pytest.raises(ConfigError, match=f"profiling.{key}"):
            validate(job_config)


# ---- 3. token folders verified when opened ---------------------------------------------------------

@pytest.fixture(scope="module")
def token_dir(tmp_path_factory) -> str:
    """12 documents of the debug corpus in shards of ~300 tokens (several)."""
    tmp = tmp_path_factory.mktemp("tokens")
    corpus = tmp / "corpus.jsonl"
    with open(os.path.join(ASSETS, "corpus.jsonl")) as f:
        corpus.write_text("".join(f.readlines()[:12]))
    tokenize(str(corpus), str(tmp / "tokens"), ASSETS, "auto", "text", workers=1, shard_tokens=300)
    return str(tmp / "tokens")


def cut(path: str, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


def overwrite(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def set_dtype(folder: str, dtype: str) -> None:
    path = os.path.join(folder, "metadata.json")
    metadata = json.load(open(path))
    json.dump(dict(metadata, dtype=dtype), open(path, "w"))


DAMAGE = {  # name -> (damage(folder), how the line goes on after the folder, what else it says)
    "shard cut short": (lambda d: cut(f"{d}/shard-00001.bin", 100), "/shard-00001.bin has 100 bytes", "tokenize the corpus again"),
    "shard missing": (lambda d: os.remove(f"{d}/shard-00002.bin"), "/shard-00002.bin is missing", "tokenize the corpus again"),
    "bytes of 0xFF": (lambda d: overwrite(f"{d}/shard-00001.bin", 20, b"\xff\xff"), "/shard-00001.bin holds token id 65535",
                      "but the tokenizer has 506 tokens"),
    "index cut": (lambda d: cut(f"{d}/shard-00000.idx.npy", 90), "/shard-00000.idx.npy is unreadable", ""),
    "index out of order": (lambda d: np.save(f"{d}/shard-00000.idx.npy", np.load(f"{d}/shard-00000.idx.npy")[::-1].copy()),
                           "/shard-00000.idx.npy does not index its shard", ""),
    "metadata cut": (lambda d: cut(f"{d}/metadata.json", 200), "/metadata.json is not valid JSON", ""),
    "metadata not JSON": (lambda d: open(f"{d}/metadata.json", "w").write("tokens, I think"), "/metadata.json is not valid JSON", ""),
    "unknown dtype": (lambda d: set_dtype(d, "float32"), "/metadata.json is damaged", "dtype (uint16 or uint32)"),
    "no metadata": (lambda d: os.remove(f"{d}/metadata.json"), " holds shard files but no metadata.json",
                    "an unfinished tokenize_corpus run"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_token_folder_is_refused_naming_the_file(token_dir, tmp_path, damage):
    folder = str(tmp_path / "tokens")
    shutil.copytree(token_dir, folder)
    harm, names, says = DAMAGE[damage]
    harm(folder)
    with pytest.raises(DataError) as refused:
        build_recipe(parse_config(["--training.dataset_path", folder, "--model.hf_assets_path", ASSETS]))
    message = str(refused.value)
    assert message.startswith(f"{folder}{names}"), message
    assert says in message and "\n" not in message


def test_truncated_shard_is_refused_before_step_1(token_dir, tmp_path, capsys):
    """Before: nine steps trained, then an IndexError. Now exit 2 and one line, through train.py's main."""
    folder = str(tmp_path / "tokens")
    shutil.copytree(token_dir, folder)
    cut(f"{folder}/shard-00003.bin", 10)
    code = run(train_main, ["--job.config_file", DEBUG, "--training.dataset_path", folder, "--job.dump_folder", str(tmp_path / "d")])
    assert code == 2 and capsys.readouterr().err.splitlines() == [
        f"error: {folder}/shard-00003.bin has 10 bytes; metadata.json records "
        f"{json.load(open(f'{folder}/metadata.json'))['shards'][3]['num_tokens']} uint16 tokens "
        f"({2 * json.load(open(f'{folder}/metadata.json'))['shards'][3]['num_tokens']} bytes): the shard is damaged, "
        "tokenize the corpus again"]
