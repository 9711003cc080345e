"""Checkpoints users can trust, on CPU ranks (gloo): every claim of checkpoint/ and
the two conversion commands, exercised through train.py and the scripts themselves.

One tiny random Qwen3 (transformers) is converted to DCP once; every training run starts from it,
so runs under different layouts are comparable step by step.
"""

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from longctx import launch, train
from longctx.checkpoint.dcp import CheckpointError, latest_step, load_dcp_model, resolve_dcp_path
from longctx.checkpoint.source import weight_source
from longctx.config import parse_config
from longctx.launch import validate
from longctx.models import get_model_spec
from longctx.models.common.decoder import Decoder
from scripts import compute_logprobs, convert_dcp_to_hf, convert_hf_to_dcp
from tests.conftest import ROOT
from tests.distributed_harness import run_on_ranks

DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
ENV = {k: v for k, v in os.environ.items() if k not in DIST_ENV} | {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
STEPS = 6
GLOBAL_BATCH = 4
TINY = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def run(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def python(args: list[str]) -> list[str]:
    """One rank without torchrun: SIGKILL reaches the trainer itself (torchrun starts its workers
    in sessions of their own, so killing torchrun's process group would leave them running)."""
    return [sys.executable, "train.py", *args]


def train_args(dcp_dir: str, dump: str, layout: dict | None = None, extra=(), init=None) -> list[str]:
    """The tiny model from `dcp_dir` (or `init` arguments) on the debug corpus: fp32,
    deterministic, same global batch under every layout, a checkpoint every 2 steps."""
    layout = layout or {}
    dp = layout.get("dp_shard", 1)
    args = [
        "--job.config_file", "train_configs/debug.toml", "--job.dump_folder", dump,
        "--model.flavor", dcp_dir, "--model.hf_assets_path", "assets/debug",
        *(init or ["--checkpoint.initial_load_path", dcp_dir]),
        "--training.seq_len", "64", "--training.steps", str(STEPS),
        "--training.global_batch_size", str(GLOBAL_BATCH), "--training.local_batch_size", str(GLOBAL_BATCH // dp),
        "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1", "--metrics.no-enable-tensorboard",
        "--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0",
        "--debug.deterministic", "--debug.seed", "0", "--comm.init_timeout_seconds", "120",
        "--parallelism.data_parallel_shard_degree", str(dp),
        "--parallelism.context_parallel_degree", str(layout.get("cp", 1)),
        "--parallelism.tensor_parallel_degree", str(layout.get("tp", 1)),
    ]
    return args + list(extra)


def losses(dump: str) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a resumed run appends, so the last record of a step wins."""
    with open(os.path.join(dump, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def hashes(*folders: str) -> dict[str, str]:
    """path -> sha256 of every file below the folders, hidden ones (DCP's .metadata) included."""
    files = [os.path.join(d, name) for folder in folders for d, _, names in os.walk(folder) for name in names]
    return {f: hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files}


def read_hf(folder: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="module")
def hf_model(make_tiny_hf):
    return make_tiny_hf("qwen3", tie_word_embeddings=False, **TINY)


def _forget_process_group_env() -> None:
    for name in DIST_ENV:
        os.environ.pop(name, None)  # the next script call picks a fresh port


def convert(script, argv: list[str]) -> None:
    """A conversion command, in this process, as its __main__ runs it: it starts and ends a 1-rank
    process group; each call gets a fresh port."""
    _forget_process_group_env()
    try:
        code = launch.run(script.main, argv)
    finally:
        if dist.is_initialized():  # a refused command leaves its group to the process's exit
            dist.destroy_process_group()
        _forget_process_group_env()
    if code:
        raise SystemExit(code)


@pytest.fixture(scope="module")
def dcp_dir(hf_model, tmp_path_factory):
    """The command users run: HF folder -> DCP checkpoint train.py starts from."""
    out = str(tmp_path_factory.mktemp("converted") / "dcp")
    convert(convert_hf_to_dcp, [hf_model.path, out])
    return out


@pytest.fixture(scope="module")
def reference(dcp_dir, tmp_path_factory):
    """One uninterrupted 1-rank run: step -> loss, and its dump folder (checkpoints every 2 steps)."""
    dump = str(tmp_path_factory.mktemp("reference"))
    run(python(train_args(dcp_dir, dump)))
    return losses(dump), dump


def test_hf_to_dcp_to_hf_is_bit_identical(hf_model, dcp_dir, tmp_path):
    out = str(tmp_path / "hf")
    convert(convert_dcp_to_hf, [dcp_dir, out, "--job.config_file", "train_configs/debug.toml",
                                "--model.flavor", dcp_dir, "--dtype", "fp32", "--checkpoint.export_max_shard_gb", "0.0001"])
    original, exported = read_hf(hf_model.path), read_hf(out)
    assert len(glob.glob(os.path.join(out, "*.safetensors"))) > 1, "expected a sharded export"
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"]) == set(original)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert config["torch_dtype"] == "float32" and config["hidden_size"] == 64 and config["num_key_value_heads"] == 2
    assert os.path.isfile(os.path.join(out, "tokenizer.json")) and os.path.isfile(os.path.join(out, "generation_config.json"))


@pytest.mark.parametrize("script", [convert_hf_to_dcp, convert_dcp_to_hf])
def test_commands_have_help(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "DCP_DIR" in out and "HF_DIR" in out, out


def test_tied_hf_to_dcp_to_hf_in_bf16(make_tiny_hf, tmp_path):
    """Tied embeddings (Qwen3-0.6B's layout) through the same commands, exported in bf16."""
    hf = make_tiny_hf("qwen3", tie_word_embeddings=True, **TINY)
    convert(convert_hf_to_dcp, [hf.path, str(tmp_path / "dcp")])
    convert(convert_dcp_to_hf, [str(tmp_path / "dcp"), str(tmp_path / "hf"), "--job.config_file",
                                "train_configs/debug.toml", "--model.flavor", str(tmp_path / "dcp"), "--dtype", "bf16"])
    original, exported = read_hf(hf.path), read_hf(str(tmp_path / "hf"))
    assert exported.keys() == original.keys() - {"lm_head.weight"}
    for name, tensor in exported.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, original[name].bfloat16()), name
    assert json.load(open(tmp_path / "hf" / "config.json"))["tie_word_embeddings"] is True


@pytest.mark.slow
def test_round_trip_logits_after_training(dcp_dir, reference, tmp_path):
    """HF -> DCP -> train.py 2 steps -> HF: transformers' logits equal our model's at that step."""
    from transformers import AutoModelForCausalLM

    _, dump = reference
    step2, out = os.path.join(dump, "checkpoint", "step-2"), str(tmp_path / "hf")
    convert(convert_dcp_to_hf, [step2, out, "--job.config_file", "train_configs/debug.toml", "--model.flavor", dcp_dir,
                                "--dtype", "fp32"])
    spec = get_model_spec("qwen3")
    model = Decoder(spec.args_for(dcp_dir))
    load_dcp_model(model, step2)
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        ours, theirs = model.eval()(tokens), hf(tokens).logits
    err = (ours - theirs).abs().max().item()
    assert err < 1e-4, f"max |logits difference| {err:.2e}"
    untrained = Decoder(spec.args_for(dcp_dir))
    load_dcp_model(untrained, dcp_dir)
    assert not torch.equal(untrained(tokens), ours), "step-2 weights equal the initial ones: no training happened"


@pytest.mark.slow
def test_kill_and_resume_is_exact(dcp_dir, reference, tmp_path):
    """SIGKILL once a checkpoint exists, restart the same command: every step's loss is the
    uninterrupted run's, bit for bit (same data order, optimizer, schedule)."""
    ref_losses, _ = reference
    dump = str(tmp_path / "run")
    command = python(train_args(dcp_dir, dump))
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = os.path.join(dump, "checkpoint")
    deadline = time.monotonic() + 180
    while latest_step(checkpoints) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    finished_early = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not finished_early, "the run ended before it could be killed mid-way"
    killed_at, resumed_from = max(losses(dump)), latest_step(checkpoints)
    assert killed_at < STEPS, f"killed after the last step ({killed_at})"
    # Also a save killed before its `.metadata` landed (the kill above may or may not have hit one).
    partial = os.path.join(checkpoints, f"step-{resumed_from + 2}")
    if not os.path.exists(partial):
        shutil.copytree(os.path.join(checkpoints, f"step-{resumed_from}"), partial,
                        ignore=shutil.ignore_patterns(".metadata"))

    resumed = run(command)
    assert f"checkpoint {checkpoints}/step-{resumed_from}" in resumed.stdout, resumed.stdout[-2000:]
    got = losses(dump)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == ref_losses, f"killed after step {killed_at}, resumed {resumed_from}: {got} vs {ref_losses}"


def reshard_runs(cases: list[list[str]]) -> list[dict[int, float]]:
    """On every rank: train each case in turn, in one process group; step -> loss."""
    results = []
    for case in cases:
        job_config = parse_config(case)
        job = validate(job_config)
        _, records = train.train(job_config, job, torch.device("cpu"))
        results.append({r["step"]: r["loss"] for r in records})
    return results


@pytest.mark.slow
def test_reshard_on_resume(hf_model, dcp_dir, reference, tmp_path):
    """Saved under dp2 x tp2 (from the HF weights, sharded on load), resumed under cp2 x dp2 at
    step 4 (load_step; the step-6 it had is rewritten): the same losses within 1e-5. The HF
    exports, live from the dp2 x tp2 shards and by the command from its checkpoint, are exact."""
    ref_losses, _ = reference
    dump = str(tmp_path / "run")
    hf_init = ["--checkpoint.initial_load_path", hf_model.path, "--checkpoint.initial_load_in_hf"]
    saved = train_args(dcp_dir, dump, {"dp_shard": 2, "tp": 2},
                       ["--checkpoint.export_interval", "4", "--checkpoint.last_save_in_hf"], init=hf_init)
    # Checkpoint-wrapped blocks on resume only: parameter names must not depend on wrappers.
    resumed = train_args(dcp_dir, dump, {"dp_shard": 2, "cp": 2},
                         ["--checkpoint.load_step", "4", "--activation_checkpoint.mode", "full"])
    full, cont = run_on_ranks(4, reshard_runs, [saved, resumed])
    assert sorted(cont) == list(range(5, STEPS + 1)), f"resumed at the wrong step: {sorted(cont)}"
    for step, loss in cont.items():
        assert abs(loss - full[step]) <= 1e-5 * abs(full[step]), f"step {step}: {loss} vs dp2xtp2 {full[step]}"
        assert abs(loss - ref_losses[step]) <= 1e-5 * abs(ref_losses[step]), f"step {step}: {loss} vs 1 rank"
    assert sorted(os.listdir(os.path.join(dump, "hf"))) == ["step-4", "step-6"]  # every 4 steps, and the last
    exported = read_hf(os.path.join(dump, "hf", "step-4"))
    spec = get_model_spec("qwen3")
    model = Decoder(spec.args_for(dcp_dir))
    load_dcp_model(model, os.path.join(dump, "checkpoint", "step-4"))
    saved_hf = spec.state_dict_adapter(model.args).to_hf(model.state_dict())
    converted = str(tmp_path / "converted")  # the command, from the same dp2 x tp2 checkpoint
    convert(convert_dcp_to_hf, [os.path.join(dump, "checkpoint", "step-4"), converted, "--job.config_file",
                                "train_configs/debug.toml", "--model.flavor", dcp_dir, "--dtype", "fp32"])
    converted = read_hf(converted)
    assert exported.keys() == saved_hf.keys() == converted.keys()
    for name, tensor in saved_hf.items():
        assert torch.equal(exported[name], tensor) and torch.equal(converted[name], tensor), name


@pytest.mark.slow
def test_incomplete_checkpoint_is_never_picked(reference, tmp_path):
    """A save killed at any moment lacks `.metadata` (DCP writes it last): never the latest."""
    _, dump = reference
    folder = str(tmp_path / "checkpoint")
    shutil.copytree(os.path.join(dump, "checkpoint", "step-2"), os.path.join(folder, "step-2"))
    shutil.copytree(os.path.join(dump, "checkpoint", "step-4"), os.path.join(folder, "step-4"))
    os.remove(os.path.join(folder, "step-4", ".metadata"))  # killed before its metadata landed
    os.makedirs(os.path.join(folder, "step-6"))  # killed right after creating the folder
    assert latest_step(folder) == 2
    assert resolve_dcp_path(folder) == os.path.join(folder, "step-2")
    with pytest.raises(CheckpointError, match="not a complete DCP checkpoint"):
        resolve_dcp_path(os.path.join(folder, "step-4"))


# ---------------------------------------------------------------- damaged checkpoints


def _cut_in_half(step_folder: str) -> str:
    """A copy cut short or a disk that filled up: the first data file loses its second half."""
    file = sorted(glob.glob(os.path.join(step_folder, "*.distcp")))[0]
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])
    return os.path.basename(file)


def _contents(folder: str) -> dict[str, str]:
    return {os.path.relpath(path, folder): digest for path, digest in hashes(folder).items()}


@pytest.mark.slow
def test_damaged_step_is_one_line_and_resume_falls_back(dcp_dir, reference, tmp_path, capsys):
    """A truncated .distcp in the latest step: as initial_load_path and to convert_dcp_to_hf it is
    one line naming the folder and file; a resumed run takes the step before it (one log line),
    trains on exactly as the uninterrupted run, and keeps the damaged folder (moved aside, out of
    reach of keep_latest_k and of the new step-6)."""
    ref_losses, ref_dump = reference
    dump = str(tmp_path / "run")
    checkpoints = os.path.join(dump, "checkpoint")
    shutil.copytree(os.path.join(ref_dump, "checkpoint"), checkpoints)
    step6 = os.path.join(checkpoints, "step-6")
    reason = f"{step6}: {_cut_in_half(step6)} is truncated"
    damaged = _contents(step6)

    fresh = train_args(dcp_dir, str(tmp_path / "fresh"), init=["--checkpoint.initial_load_path", step6])
    to_hf = [step6, str(tmp_path / "hf"), "--job.config_file", "train_configs/debug.toml", "--model.flavor", dcp_dir]
    for script, argv in [(train, fresh), (convert_dcp_to_hf, to_hf)]:
        with pytest.raises(SystemExit) as exit_info:
            convert(script, argv)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert exit_info.value.code == 2 and len(errors) == 1 and reason in errors[0] and "Traceback" not in err, err
    assert _contents(step6) == damaged and not os.path.exists(tmp_path / "hf")

    try:
        convert(train, train_args(dcp_dir, dump, extra=["--checkpoint.keep_latest_k", "2"]))
    finally:
        torch.use_deterministic_algorithms(False)  # train.main set it for --debug.deterministic
    out = capsys.readouterr().out
    assert any(f"checkpoint {checkpoints}/step-4, the newest undamaged step" in line and reason in line
               for line in out.splitlines()), out[-3000:]
    got = losses(dump)
    assert sorted(got) == [5, 6], got
    for step, loss in got.items():  # in this process, not the reference's: threads may differ
        assert abs(loss - ref_losses[step]) <= 1e-5 * abs(ref_losses[step]), f"step {step}: {loss} vs {ref_losses[step]}"
    assert _contents(os.path.join(checkpoints, "damaged", "step-6")) == damaged
    assert {"damaged", "step-4", "step-6"} <= set(os.listdir(checkpoints))  # keep_latest_k 2 purges in a thread
    assert resolve_dcp_path(checkpoints) == step6 and _contents(step6) != damaged


@pytest.mark.slow
def test_unreadable_metadata_and_no_undamaged_step(reference, tmp_path):
    """Every complete step damaged: a resume refuses (one line) instead of starting over; an
    explicit load_step of a damaged step names it."""
    _, ref_dump = reference
    dump = str(tmp_path / "run")
    folder = os.path.join(dump, "checkpoint")
    for step in (2, 4):
        shutil.copytree(os.path.join(ref_dump, "checkpoint", f"step-{step}"), os.path.join(folder, f"step-{step}"))
    open(os.path.join(folder, "step-2", ".metadata"), "wb").write(b"not a pickle")
    _cut_in_half(os.path.join(folder, "step-4"))
    config = ["--job.config_file", "train_configs/debug.toml", "--job.dump_folder", dump, "--checkpoint.enable"]
    with pytest.raises(CheckpointError, match=f"every complete step in {folder} is damaged; the newest: {folder}/step-4: "):
        weight_source(parse_config(config))
    with pytest.raises(CheckpointError, match=f"^{folder}/step-2: .metadata is unreadable"):
        weight_source(parse_config(config + ["--checkpoint.load_step", "2"]))


@pytest.mark.slow
def test_compute_logprobs_scores_the_runs_latest_step(dcp_dir, reference, tmp_path, capsys):
    """compute_logprobs.py with --checkpoint.enable scores the run's own latest step, model only:
    the same log-probs as that step named as checkpoint.initial_load_path, not those of step-4."""
    _, ref_dump = reference
    rollouts = str(tmp_path / "rollouts.jsonl")
    with open(rollouts, "w") as f:
        f.writelines(json.dumps({"prompt_ids": [5, 6, 7], "response_ids": [8, 9], "advantage": 1.0}) + "\n" for _ in range(2))
    scored = {}
    for name, weights in [("run", ["--job.dump_folder", ref_dump, "--checkpoint.enable"]),
                          ("step-6", ["--checkpoint.initial_load_path", os.path.join(ref_dump, "checkpoint", "step-6")]),
                          ("step-4", ["--checkpoint.initial_load_path", os.path.join(ref_dump, "checkpoint", "step-4")])]:
        out = str(tmp_path / f"{name}.jsonl")
        convert(compute_logprobs, ["--job.config_file", "train_configs/debug_policy.toml", "--input", rollouts, "--output", out,
                                   "--model.flavor", dcp_dir, "--training.seq_len", "64", *weights])
        scored[name] = [r["response_logprobs"] for r in compute_logprobs.read_jsonl(out)]
    lines = capsys.readouterr().out.splitlines()
    assert f"weights: DCP checkpoint {ref_dump}/checkpoint/step-6, model only" in lines, lines  # the "run" case
    assert scored["run"] == scored["step-6"] != scored["step-4"]


# ---------------------------------------------------------------- the recorded model


YARN = ["--model.rope_scaling", "type", "yarn", "factor", "4.0", "original_max_position_embeddings", "64"]


@pytest.mark.slow
def test_resume_of_another_model_is_refused_and_an_initial_load_may_change_it(dcp_dir, reference, tmp_path, capsys):
    """A checkpoint records its model: a resume under a config that defines another one stops before
    any weight is read, with one line naming each difference; the same step as
    checkpoint.initial_load_path (weights only: the way to change the model, here to start a YaRN
    extension) trains, logging what changed."""
    _, ref_dump = reference
    dump, step2 = str(tmp_path / "run"), os.path.join(ref_dump, "checkpoint", "step-2")
    shutil.copytree(step2, os.path.join(dump, "checkpoint", "step-2"))
    before = hashes(dump)
    other = train_args(dcp_dir, dump, extra=YARN)
    other[other.index("--model.flavor") + 1] = "debugmodel"  # 4 layers of 256, not 2 of 64
    extended = train_args(dcp_dir, str(tmp_path / "extended"), extra=[*YARN, "--training.steps", "1"],
                          init=["--checkpoint.initial_load_path", step2])
    try:
        with pytest.raises(SystemExit) as exit_info:
            convert(train, other)
        refused = capsys.readouterr()
        convert(train, extended)
    finally:
        torch.use_deterministic_algorithms(False)  # train.main set it for --debug.deterministic
    errors = [line for line in refused.err.splitlines() if line.startswith("error: ")]
    assert exit_info.value.code == 2 and len(errors) == 1 and "Traceback" not in refused.err, refused.err
    yarn = "rope_scaling: none in the checkpoint, yarn factor 4.0 original_max_position_embeddings 64 in this config"
    for difference in ("dim: 64 in the checkpoint, 256 in this config", "n_layers: 2 in the checkpoint, 4 in this config", yarn):
        assert difference in errors[0], errors[0]
    assert "checkpoint.initial_load_path" in errors[0] and "step " not in refused.out
    assert hashes(dump) == before
    assert f"{step2}: its weights into a changed model: {yarn}" in capsys.readouterr().out
    assert sorted(losses(str(tmp_path / "extended"))) == [1]


def test_model_only_step_is_not_resumed(dcp_dir, tmp_path, capsys):
    """A model-only checkpoint copied into the run's checkpoint folder as a step: one line, not a
    DCP traceback about missing keys."""
    step = str(tmp_path / "run" / "checkpoint" / "step-2")
    shutil.copytree(dcp_dir, step)
    try:
        with pytest.raises(SystemExit) as exit_info:
            convert(train, train_args(dcp_dir, str(tmp_path / "run")))
    finally:
        torch.use_deterministic_algorithms(False)  # train.main set it for --debug.deterministic
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert f"error: {step} holds no optimizer, lr_scheduler, dataloader, train_state state, only model weights" in err, err


def _read_data_fails_with(error: BaseException):
    def read_data(self, plan, planner):
        raise error
    return read_data


def test_checkpoint_at_fault_is_one_line_and_a_bug_keeps_its_traceback(dcp_dir, tmp_path, monkeypatch, capsys):
    """A read that fails on the files (one gone since it was checked) is a CheckpointError naming the
    folder, its cause chained; any other failure inside dcp.load (here a ZeroDivisionError) is a bug:
    the command exits 1 with the traceback."""
    model = Decoder(get_model_spec("qwen3").args_for(dcp_dir))
    monkeypatch.setattr(FileSystemReader, "read_data", _read_data_fails_with(FileNotFoundError("__0_0.distcp")))
    with pytest.raises(CheckpointError, match=f"^cannot load {dcp_dir}: FileNotFoundError: __0_0.distcp$") as info:
        load_dcp_model(model, dcp_dir)
    assert isinstance(info.value.__cause__, CheckpointException)

    monkeypatch.setattr(FileSystemReader, "read_data", _read_data_fails_with(ZeroDivisionError("a bug")))
    with pytest.raises(SystemExit) as exit_info:
        convert(convert_dcp_to_hf, [dcp_dir, str(tmp_path / "hf"), "--job.config_file", "train_configs/debug.toml",
                                    "--model.flavor", dcp_dir])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" in err and "ZeroDivisionError: a bug" in err and "error: " not in err, err


# ---------------------------------------------------------------- bad checkpoints


def _edit_tensors(path: str, edit) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _edit_config(path: str, **changes) -> None:
    file = os.path.join(path, "config.json")
    config = json.load(open(file)) | changes
    json.dump(config, open(file, "w"))


def _truncate(path: str) -> None:
    file = os.path.join(path, "model.safetensors")
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])


BAD_CASES = {
    "missing key": (lambda p: _edit_tensors(p, lambda t: t.pop("model.layers.1.mlp.down_proj.weight")),
                    "missing keys model.layers.1.mlp.down_proj.weight"),
    "extra key": (lambda p: _edit_tensors(p, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(2)})),
                  "unexpected keys model.layers.2.mlp.up_proj.weight"),
    "wrong shape": (lambda p: _edit_tensors(p, lambda t: t.update({"model.norm.weight": torch.ones(32)})),
                    "shape mismatch: model.norm.weight (32,) vs model (64,)"),
    "quantized dtype": (lambda p: _edit_tensors(p, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int8)})),
                        "dtype mismatch: model.norm.weight is I8"),
    "truncated file": (_truncate, "(truncated or not safetensors?)"),
    "wrong architecture": (lambda p: _edit_config(p, architectures=["Qwen2ForCausalLM"]),
                           "expects Qwen3ForCausalLM"),
    "wrong model_type": (lambda p: _edit_config(p, model_type="llama", architectures=["LlamaForCausalLM"]),
                         "model_type='llama' is not supported"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_hf_checkpoint_is_one_line_and_touches_nothing(case, hf_model, tmp_path, capsys):
    damage, reason = BAD_CASES[case]
    bad = str(tmp_path / "bad")
    shutil.copytree(hf_model.path, bad)
    damage(bad)
    existing = str(tmp_path / "existing")
    os.makedirs(existing)
    open(os.path.join(existing, "keep.txt"), "w").write("a user's file")
    before = hashes(bad, existing)
    with pytest.raises(SystemExit) as exit_info:
        convert(convert_hf_to_dcp, [bad, os.path.join(existing, "dcp")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and "\n" not in err and reason in err, err
    assert hashes(bad, existing) == before
    assert not os.path.exists(os.path.join(existing, "dcp")) and not os.path.exists(os.path.join(existing, "dcp.partial"))


def test_dcp_checkpoint_of_another_flavor_is_refused(dcp_dir, tmp_path, capsys):
    before = hashes(dcp_dir)
    with pytest.raises(SystemExit) as exit_info:
        convert(convert_dcp_to_hf, [dcp_dir, str(tmp_path / "hf"), "--job.config_file", "train_configs/debug.toml"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err, err
    assert "missing keys layers.2.attention.k_norm.weight" in err, err  # debugmodel has 4 layers, this 2
    assert hashes(dcp_dir) == before and not os.path.exists(tmp_path / "hf")


@pytest.mark.slow
def test_train_refuses_config_that_disagrees_with_flavor(hf_model, reference, tmp_path):
    """train.py: HF weights whose config.json disagrees with model.flavor stop the run before any
    step with one line, and nothing in the HF folder or the run's folder changes."""
    _, ref_dump = reference
    dump = str(tmp_path / "run")
    shutil.copytree(os.path.join(ref_dump, "checkpoint", "step-2"), os.path.join(dump, "earlier", "step-2"))
    before = hashes(hf_model.path, dump)
    args = ["--job.config_file", "train_configs/debug.toml", "--job.dump_folder", dump, "--checkpoint.enable",
            "--checkpoint.initial_load_path", hf_model.path, "--checkpoint.initial_load_in_hf", "--training.steps", "2"]
    env = ENV | {"PYTHONWARNINGS": "ignore"}  # stderr then holds only what train.py itself says
    result = subprocess.run(python(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "disagrees with model.flavor" in err and "; dim 64 vs 256;" in err, err
    assert "step " not in result.stdout
    assert hashes(hf_model.path, dump) == before
