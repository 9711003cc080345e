"""Where two features meet, a new user's way: each case the way the README says it behaves.

- Preemption through the launcher: SIGTERM to scripts/run_train.sh or SIGINT to its whole process
  group (Slurm, Ctrl-C) -> the workers save, one stop line, exit 0, no traceback, and the resumed
  run is bit-identical to an uninterrupted one; a failed run still exits non-zero.
- Each script's own flags and output paths, and the profiler's folders, refused before any work
  with one line naming the flag or key.
- A damaged token folder is refused when opened, naming the damaged file.
- Held-out data is read and checked before any process group, exactly as training data, and a
  refusal names validation.*.
- Recipes x features: a policy rollout longer than training.seq_len is refused before step 1;
  SFT and policy train under a seq_len_schedule (rows at each stage's length, long ones cut and
  counted); SFT records that would train nonsense are refused with file:line.
- The right key blamed: recipe.chat_template_kwargs, the template file, --ngpu (above).
"""

import json
import math
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from longctx import train
from longctx.base import ConfigError, DataError
from longctx.checkpoint.dcp import latest_step
from longctx.config import parse_config
from longctx.config import rules as config_rules
from longctx.data.tokenize_corpus import tokenize_corpus as tokenize
from longctx.data.tokenizer import HFTokenizer
from longctx.launch import run, validate
from longctx.recipes import build_recipe
from longctx.train import main as train_main
from scripts import compute_logprobs, convert_dcp_to_hf, convert_hf_to_dcp, make_debug_assets, plan, show_sft, tokenize_corpus
from tests.conftest import ROOT
from tests.test_chat_template import assets_with
from tests.test_faults import CONSTANT_LR, args, metrics
from tests.test_faults_torchrun import assert_same_steps, environment
from tests.test_recipes import rank_env

DEBUG = "train_configs/debug.toml"
ASSETS = os.path.join(ROOT, "assets", "debug")
SFT, POLICY = "train_configs/debug_sft.toml", "train_configs/debug_policy.toml"
DEBUG_VOCAB = 2048  # the debug model's vocab_size


def jsonl(path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def rollout(prompt: int, response: int) -> dict:
    return {"prompt_ids": [5] * prompt, "response_ids": [7] * response, "advantage": 1.0}


# ---- 1. preemption through the launcher ------------------------------------------------------------

def launcher_args(dump, *extra, steps: int) -> list[str]:
    """tests/test_faults' arguments for 2 ranks, less --job.config_file (the launcher's CONFIG_FILE)."""
    return args(dump, "--checkpoint.enable", "--checkpoint.interval", "1000", *CONSTANT_LR, *extra, steps=steps, dp=2)[2:]


def run_train_sh(argv: list[str], ngpu: int = 2, sigint_ignored: bool = False) -> subprocess.Popen:
    """scripts/run_train.sh in a session of its own: its process group is the launcher's, as under
    Slurm. sigint_ignored: started with SIGINT ignored, as a script's background job is."""
    env = dict(environment("gloo"), NGPU=str(ngpu), CONFIG_FILE=DEBUG, OMP_NUM_THREADS="1")
    command = ["bash", "scripts/run_train.sh", *argv]
    if sigint_ignored:
        command = ["bash", "-c", 'trap "" INT; exec "$@"', "bash", *command]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def preempt(dump, send, sigint_ignored: bool = False) -> tuple[subprocess.Popen, str, str]:
    """A 1000-step run on 2 ranks, sent a signal by send(process) once it has logged step 2."""
    proc = run_train_sh(launcher_args(dump, steps=1000), sigint_ignored=sigint_ignored)
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
    # Ctrl-C, or Slurm signalling every process: torchrun gets it too. The launcher starts with
    # SIGINT ignored, as a background job of a script does (and pytest's own may be): it must
    # restore it to trap it.
    group = tmp_path / "sigint"
    assert_preempted(*preempt(group, lambda p: os.killpg(p.pid, signal.SIGINT), sigint_ignored=True), group, "SIGINT")

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
        (make_debug_assets.main, ["--out-dir", missing, "--corpus-docs", "0", "--corpus-only"], "--corpus-docs 0 must be >= 1"),
    ]


def test_script_flags_and_outputs_are_refused_first_in_one_line(tmp_path, capsys):
    for main, argv, line in script_refusals(tmp_path):
        assert run(main, argv) == 2, (main.__module__, argv)
        errors = capsys.readouterr().err.splitlines()
        assert len(errors) == 1 and errors[0].startswith(f"error: {line}"), (main.__module__, errors)
    assert not os.path.exists(tmp_path / "missing") and not os.path.exists(tmp_path / "o.jsonl")


@pytest.mark.parametrize("key", ["save_traces_folder", "save_memory_snapshot_folder"])
def test_profiler_folder_that_is_a_file_is_refused_before_step_1(tmp_path, key, monkeypatch):
    (tmp_path / "taken").write_text("a file where the profiler writes its folder")
    monkeypatch.setattr(config_rules, "_has_cuda", lambda: True)  # snapshots are refused outright without CUDA
    enable = "enable_profiling" if key == "save_traces_folder" else "enable_memory_snapshot"
    with pytest.raises(ConfigError, match=f"profiling.{key}='taken/inner' must be a folder name under job.dump_folder"):
        parse_config(["--job.config_file", DEBUG, "--job.dump_folder", str(tmp_path), f"--profiling.{enable}",
                      f"--profiling.{key}", "taken/inner"])


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
                      f"but the tokenizer has {HFTokenizer(ASSETS).vocab_size} tokens"),
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


# ---- 4. held-out data read and checked as training data --------------------------------------------

def held_out_job(tmp_path, config: str, held_out: str, *extra: str):
    return validate(parse_config(["--job.config_file", config, "--job.dump_folder", str(tmp_path / "dump"),
                                  "--validation.enable", "--validation.dataset_path", held_out, *extra]))


def test_held_out_data_is_checked_before_any_process_group(tmp_path):
    missing = str(tmp_path / "no" / "such.jsonl")
    with pytest.raises(DataError, match=f"^validation.dataset_path='{missing}' does not exist"):
        held_out_job(tmp_path, DEBUG, missing)
    empty = jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match=f"^validation.dataset_path='{empty}' has no documents"):
        held_out_job(tmp_path, DEBUG, empty)
    big_id = jsonl(tmp_path / "ids.jsonl", [rollout(2, 1), {**rollout(2, 1), "response_ids": [DEBUG_VOCAB]}])
    with pytest.raises(DataError, match=f"^{big_id}:2: token id {DEBUG_VOCAB} >= the model's vocab_size {DEBUG_VOCAB}"):
        held_out_job(tmp_path, POLICY, big_id)
    long = jsonl(tmp_path / "long.jsonl", [rollout(2, 1), rollout(30, 10)])
    with pytest.raises(DataError, match=f"^{long}:2: the rollout has 40 tokens, more than validation.seq_len=32"):
        held_out_job(tmp_path, POLICY, long, "--validation.seq_len", "32")
    job = held_out_job(tmp_path, POLICY, long)  # rows of training.seq_len=256 hold it
    assert job.held_out is not job.recipe and len(job.held_out.documents) == 2


# ---- 5. recipes x features --------------------------------------------------------------------------

def test_rollout_longer_than_seq_len_is_refused_before_step_1(tmp_path, capsys):
    path = jsonl(tmp_path / "rollouts.jsonl", [rollout(4, 2), rollout(250, 20)])
    code = run(train_main, ["--job.config_file", POLICY, "--training.dataset_path", path, "--job.dump_folder", str(tmp_path)])
    assert code == 2 and capsys.readouterr().err.splitlines() == [
        f"error: {path}:2: the rollout has 270 tokens, more than training.seq_len=256; "
        "a rollout trains whole: raise training.seq_len or drop the rollout"]
    assert not os.path.exists(tmp_path / "metrics.jsonl")


class RecordedRows:
    """A recipe whose streams record the length of every row they build (the loader's thread calls them)."""

    def __init__(self, recipe):
        self.recipe, self.rows = recipe, []

    def __getattr__(self, name):
        return getattr(self.recipe, name)

    def build_stream(self):
        stream = self.recipe.build_stream()
        build_row = stream.build_row

        def recorded(plan, row):
            built = build_row(plan, row)
            self.rows.append((row.tokens, [len(built["input_ids"])]))
            return built

        stream.build_row = recorded
        return stream


def staged_run(tmp_path, config: str, dataset: str) -> tuple[list[dict], list]:
    """10 steps through train.train under seq_len_schedule = [[0, 64], [10, 256]], one row a step."""
    staged = tmp_path / "staged.toml"
    text = open(os.path.join(ROOT, config)).read()
    staged.write_text(text.replace("seq_len = 256", "seq_len = 256\nseq_len_schedule = [[0, 64], [10, 256]]", 1))
    job_config = parse_config(["--job.config_file", str(staged), "--job.dump_folder", str(tmp_path / "run"),
                               "--training.dataset_path", dataset, "--training.steps", "10", "--training.local_batch_size", "1",
                               "--metrics.log_freq", "1",
                               "--metrics.no-enable-tensorboard"])
    job = validate(job_config)
    recipe = RecordedRows(job.recipe)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # rows of 64 tokens: a second thread only spins (4x the CPU time on a busy machine)
    with rank_env():
        dist.init_process_group("gloo", rank=0, world_size=1)
        try:
            _, records = train.train(job_config, job._replace(recipe=recipe), torch.device("cpu"))
        finally:
            dist.destroy_process_group()
            torch.set_num_threads(threads)
    return records, recipe.rows


@pytest.mark.parametrize("config", [SFT, POLICY])
def test_sft_and_policy_train_under_a_seq_len_schedule(tmp_path, config, capsys):
    """Rows of 64 tokens through step 9, of 256 at step 10; a conversation or rollout longer than
    the first stage is cut to it and counted at the end of each pass (6 records: a pass every few steps)."""
    if config == SFT:
        with open(os.path.join(ASSETS, "sft.jsonl")) as f:
            records = [json.loads(line) for line in f.readlines()[:6]]  # 67 to 108 tokens: most longer than 64
    else:
        records = [rollout(8, 8), rollout(40, 40), rollout(6, 3), rollout(20, 10), rollout(70, 30), rollout(5, 5)]
    dataset = jsonl(tmp_path / "data.jsonl", records)
    logged, rows = staged_run(tmp_path, config, dataset)
    assert [r["step"] for r in logged] == list(range(1, 11)) and all(math.isfinite(r["loss"]) for r in logged)
    assert [tokens for tokens, _ in rows[:10]] == [64] * 9 + [256]
    assert all(lengths == [tokens] for tokens, lengths in rows)  # one rank, one row: padded to its stage's length
    cut = [line for line in capsys.readouterr().out.splitlines() if "were cut to rows of 64 tokens" in line]
    assert cut and cut[0].endswith("of 6 were cut to rows of 64 tokens in this pass; "
                                   "raise training.seq_len (or the schedule's stage) to train them whole"), cut


SFT_NONSENSE = {  # record -> what its one line says after file:line
    "assistant without content": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
                                  "message 2: the assistant's content is missing; give a string"),
    "assistant content a list": ({"messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]},
                                 "message 2: the assistant's content is [{'type': 'text', 'text': 'yo'}] (a list)"),
    "tools not a list of objects": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                     "tools": ["add"]}, "tools is ['add'] (a list); give a list of objects"),
    "arguments neither object nor JSON of one": (
        {"messages": [{"role": "user", "content": "4 plus 4 ?"},
                      {"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "a=4, b=4"}}]}]},
        "message 2: the tool call {'function': {'name': 'add', 'arguments': 'a=4, b=4'}} (a dict) needs a string name"),
    "assistant before any user": ({"messages": [{"role": "system", "content": "be brief ."},
                                                {"role": "assistant", "content": "hello ."}, {"role": "user", "content": "hi"}]},
                                  "message 2 is an assistant turn before any user turn"),
}


@pytest.mark.parametrize("case", SFT_NONSENSE)
def test_sft_record_that_trains_nonsense_is_refused_with_file_and_line(tmp_path, case):
    record, says = SFT_NONSENSE[case]
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo",
                          "tool_calls": [{"function": {"name": "add", "arguments": '{"a": 4}'}}]}]}
    path = jsonl(tmp_path / "sft.jsonl", [good, record])
    recipe = build_recipe(parse_config(["--job.config_file", SFT, "--training.dataset_path", path]))
    recipe.encode_at(0)  # content beside tool_calls, arguments as a JSON string: fine
    with pytest.raises(DataError) as refused:
        recipe.encode_at(1)
    assert str(refused.value).startswith(f"{path}:2: {says}"), str(refused.value)


# ---- 6. the right key blamed ------------------------------------------------------------------------

def test_template_problems_blame_the_key_or_file_once(tmp_path, capsys):
    """Before: each blamed on line 1 of the data."""
    code = run(train_main, ["--job.config_file", SFT, "--job.dump_folder", str(tmp_path),
                            "--recipe.chat_template_kwargs", "add_generation_prompt", "True"])
    assert code == 2 and capsys.readouterr().err.splitlines() == [
        "error: recipe.chat_template_kwargs sets 'add_generation_prompt', which the recipe passes to the template itself "
        "(messages, tools, documents, add_generation_prompt); remove it"]
    folder = assets_with(tmp_path, "no_marker", template="{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    for config in (SFT, POLICY):
        with pytest.raises(DataError, match=f"^the chat template 'default' of {folder}/tokenizer_config.json renders no "
                                            "assistant turn as '<.im_start.>assistant.n ... <.im_end.>'"):
            build_recipe(parse_config(["--job.config_file", config, "--model.hf_assets_path", folder,
                                       "--recipe.apply_chat_template"]))
