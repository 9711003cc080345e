"""The loop's faults on two ranks under torchrun, as a user launches a job: over gloo on CPU here,
over NCCL with one GPU per rank where the machine has two (tests/test_faults.py covers one rank).

- A non-finite step stops both ranks: the one `error: step N: ...` line (rank 0 says it), no
  step N saved, every kept checkpoint finite.
- SIGTERM to torchrun reaches both workers: they finish the step, save and exit; the same
  command resumes bit-identically to an uninterrupted run.
- An async checkpoint (pinned memory on GPUs) resumes bit-identically: the run's last save is
  dropped, as if it had died right after an async one.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from longctx.checkpoint.dcp import latest_step
from tests.conftest import ROOT
from tests.test_faults import CONSTANT_LR, args, checkpoint_tensors, metrics

N_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
BACKENDS = [pytest.param("gloo", id="gloo, 2 CPU ranks"),
            pytest.param("nccl", id="nccl, 2 GPUs", marks=pytest.mark.skipif(N_GPUS < 2, reason="needs 2 CUDA GPUs"))]


def torchrun(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *argv]


def environment(backend: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    if backend == "gloo":
        env["CUDA_VISIBLE_DEVICES"] = ""  # train.py takes the GPUs when it sees them
    return env


def launch(backend: str, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun(argv), cwd=ROOT, env=environment(backend), capture_output=True, text=True,
                          timeout=600)


def assert_same_steps(dump, reference_dump, last: int, tmp_path) -> None:
    """Bit-identical: every logged step's values and the last checkpoint's every tensor."""
    keys = ("loss", "grad_norm", "lr", "valid_tokens")
    ours, theirs = metrics(dump), metrics(reference_dump)
    assert [r["step"] for r in ours] == list(range(1, last + 1)), "a step logged twice or missing"
    assert [[r[k] for k in keys] for r in ours] == [[r[k] for k in keys] for r in theirs]
    mine = checkpoint_tensors(str(dump / "checkpoint" / f"step-{last}"), tmp_path)
    want = checkpoint_tensors(str(reference_dump / "checkpoint" / f"step-{last}"), tmp_path)
    assert mine.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(mine[name], tensor), name


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_step_stops_both_ranks_and_keeps_the_finite_checkpoints(backend, tmp_path):
    dump = tmp_path / "diverging"
    result = launch(backend, args(dump, "--optimizer.lr", "1e3", "--checkpoint.enable", "--checkpoint.interval", "1",
                                  "--checkpoint.keep_latest_k", "2", "--checkpoint.async_mode", "async", steps=12, dp=2))
    assert result.returncode != 0, "a non-finite run exited 0"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    words = errors[0].split()
    assert words[1] == "step" and words[3] in ("loss", "grad_norm") and words[5] in ("nan;", "inf;"), errors[0]
    failed = int(words[2].rstrip(":"))
    checkpoints = str(dump / "checkpoint")
    assert latest_step(checkpoints) == failed - 1 and not os.path.exists(os.path.join(checkpoints, f"step-{failed}"))
    for name, tensor in checkpoint_tensors(os.path.join(checkpoints, f"step-{failed - 1}"), tmp_path).items():
        assert tensor.dtype == torch.int64 or torch.isfinite(tensor).all(), name


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_and_async_saves_resume_bit_identically(backend, tmp_path):
    # SIGTERM: a long run stopped once it has logged a step.
    dump = tmp_path / "preempted"
    preempt = args(dump, "--checkpoint.enable", "--checkpoint.interval", "1000", *CONSTANT_LR, steps=1000, dp=2)
    proc = subprocess.Popen(torchrun(preempt), cwd=ROOT, env=environment(backend), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (os.path.exists(dump / "metrics.jsonl") and metrics(dump)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    stdout, stderr = proc.communicate(timeout=300)
    stopped = latest_step(str(dump / "checkpoint"))
    assert stopped is not None, stderr[-3000:]
    assert f"stopped by SIGTERM after step {stopped} of 1000: checkpoint {dump}/checkpoint/step-{stopped} saved" in stdout

    # Async saves every 2 steps; the synchronous last save is dropped, so the relaunch resumes
    # from the async one.
    async_mode = "async_with_pinned_mem" if backend == "nccl" else "async"
    saved = tmp_path / "async"
    async_saves = args(saved, "--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.async_mode", async_mode,
                       *CONSTANT_LR, steps=5, dp=2)
    assert launch(backend, async_saves).returncode == 0
    shutil.rmtree(saved / "checkpoint" / "step-5")
    assert latest_step(str(saved / "checkpoint")) == 4

    last = max(stopped + 2, 6)
    reference = tmp_path / "reference"
    for dump_folder, resumes_from in ((dump, stopped), (saved, 4), (reference, None)):
        argv = args(dump_folder, "--checkpoint.enable", "--checkpoint.interval", "1000", *CONSTANT_LR, steps=last, dp=2)
        result = launch(backend, argv)
        assert result.returncode == 0, result.stderr[-3000:]
        if resumes_from is not None:  # a fresh start would match the reference too
            assert f"resuming from the run's own checkpoint {dump_folder}/checkpoint/step-{resumes_from}" in result.stdout
    for dump_folder in (dump, saved):
        assert_same_steps(dump_folder, reference, last, tmp_path)
