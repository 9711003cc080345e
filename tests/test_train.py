"""train.py end to end: the embedded default run learns and writes its metrics; bad configs exit
non-zero with one line."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CONFIG = os.path.join(ROOT, "train_configs", "debug.toml")
METRIC_KEYS = {"step", "loss", "grad_norm", "lr", "tokens_per_s", "mfu", "memory_gib"}


def run_python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """python ARGS from the repo root, as one process: without WORLD_SIZE from the caller,
    train.py makes its own 1-process group on a free port."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONWARNINGS"] = "ignore"  # stderr then holds only what train.py itself says
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_train(*args: str) -> subprocess.CompletedProcess:
    return run_python("train.py", *args)


def test_default_run_learns_and_writes_metrics(tmp_path):
    dump = tmp_path / "run"
    result = run_train("--job.config_file", CONFIG, "--job.dump_folder", str(dump),
                       "--training.steps", "20", "--metrics.log_freq", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    for r in records:
        assert METRIC_KEYS <= r.keys(), f"metrics.jsonl lacks {METRIC_KEYS - r.keys()}"
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.6 * first, f"loss {first:.4f} -> {last:.4f}: the default run should learn"
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["lr"] > 0 for r in records)
    assert any(name.startswith("events.out.tfevents") for _, _, files in os.walk(dump) for name in files)
    console = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(console) == 20, f"one readable console line per logged step; stdout:\n{result.stdout[-2000:]}"
    assert "step" in result.stdout and f"{last:8.4f}" in result.stdout  # the readable console line


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _edit(text: str, pattern: str, replacement: str) -> str:
    """debug.toml with one line changed; refuses to silently change nothing (that would train)."""
    edited, n = re.subn(pattern, replacement, text, count=1, flags=re.MULTILINE)
    assert n == 1, f"train_configs/debug.toml has no line matching {pattern!r}"
    return edited


def _error_cases(tmp) -> dict[str, list[str]]:
    with open(CONFIG) as f:
        debug_toml = f.read()
    return {
        "unknown CLI key": ["--job.config_file", CONFIG, "--training.bogus_key", "1"],
        "unknown CLI section": ["--job.config_file", CONFIG, "--bogus_section.x", "1"],
        "unknown TOML key": ["--job.config_file",
                             _write(tmp / "key.toml", _edit(debug_toml, r"^\[training\]$", "[training]\nbogus_key = 1"))],
        "unknown TOML section": ["--job.config_file", _write(tmp / "sec.toml", debug_toml + "\n[bogus_section]\nx = 1\n")],
        "broken TOML": ["--job.config_file", _write(tmp / "broken.toml", "[training\nsteps = 3\n")],
        "bad flavor": ["--job.config_file", CONFIG, "--model.flavor", "13B"],
        "bad model name": ["--job.config_file", CONFIG, "--model.name", "llama"],
        "bad int value": ["--job.config_file", CONFIG, "--training.steps", "abc"],
        "bad choice": ["--job.config_file", CONFIG, "--activation_checkpoint.mode", "bogus"],
        "bad checkpointing option": ["--job.config_file", CONFIG, "--activation_checkpoint.mode", "selective",
                                     "--activation_checkpoint.selective_ac_option", "ops"],
        "missing config file": ["--job.config_file", str(tmp / "nonexistent.toml")],
        "impossible parallel layout": ["--job.config_file", CONFIG, "--parallelism.tensor_parallel_degree", "3"],
        "bad dataset path": ["--job.config_file", CONFIG, "--training.dataset_path", str(tmp / "nothing.jsonl")],
        "bad TOML value": ["--job.config_file", _write(tmp / "value.toml", _edit(debug_toml, r"^steps = .*$", 'steps = "abc"'))],
    }


# What the one line must name, so that the user can find the bad value.
MUST_NAME = {
    "unknown CLI key": "bogus_key", "unknown CLI section": "bogus_section", "unknown TOML key": "bogus_key",
    "unknown TOML section": "bogus_section", "bad flavor": "13B", "bad model name": "llama", "bad int value": "abc",
    "bad choice": "bogus", "bad checkpointing option": "'ops'", "missing config file": "nonexistent.toml",
    "impossible parallel layout": "world_size=1",
    "bad dataset path": "nothing.jsonl", "broken TOML": "line 1", "bad TOML value": "abc",
}
CASES = list(MUST_NAME)


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory) -> dict[str, dict]:
    """Every bad config through train.py's `__main__` block, all in one process
    (tests/run_train_cases.py): each process would otherwise spend ~10 s of CPU importing torch."""
    tmp = tmp_path_factory.mktemp("bad_configs")
    cases = {name: [*args, "--job.dump_folder", str(tmp / "dump")] for name, args in _error_cases(tmp).items()}
    (tmp / "cases.json").write_text(json.dumps(cases))
    driver = run_python(os.path.join(ROOT, "tests", "run_train_cases.py"), str(tmp / "cases.json"), str(tmp / "results.json"))
    assert driver.returncode == 0, driver.stderr[-3000:]
    return json.loads((tmp / "results.json").read_text())


@pytest.mark.parametrize("case", CASES)
def test_config_error_exits_with_one_line(error_runs, case):
    result = error_runs[case]
    check_one_error_line(case, result["returncode"], result["stderr"])


def test_config_error_of_a_whole_process(tmp_path):
    """One case as its own process: nothing else (shutdown warnings, atexit) reaches stderr."""
    args = _error_cases(tmp_path)["unknown TOML key"]
    result = run_train(*args, "--job.dump_folder", str(tmp_path / "dump"))
    check_one_error_line("unknown TOML key", result.returncode, result.stderr)
    assert result.stdout == ""


def check_one_error_line(case: str, returncode: int, stderr: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode != 0, f"{case}: exit code 0"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}: stderr should be one 'error:' line, got:\n{stderr[-2000:]}"
    assert MUST_NAME[case] in lines[0], f"{case}: {lines[0]!r} does not name {MUST_NAME[case]!r}"
