"""Where two features meet, a new user's way: each case the way the README says it behaves.

- Preemption through the launcher: SIGTERM to scripts/run_train.sh or SIGINT to its whole process
  group (Slurm, Ctrl-C) -> the workers save, one stop line, exit 0, no traceback, and the resumed
  run is bit-identical to an uninterrupted one; a failed run still exits non-zero.
"""

import os
import signal
import subprocess
import time

import pytest

from longctx.checkpoint.dcp import latest_step
from tests.conftest import ROOT
from tests.test_faults import CONSTANT_LR, args, metrics
from tests.test_faults_torchrun import assert_same_steps, environment

DEBUG = "train_configs/debug.toml"


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
