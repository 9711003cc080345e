"""Run train.py's command (launch.run(train.main, args): what its `__main__` does, short of leaving the
process) once per argument list, in this one process, recording the exit code and everything
written to stderr (file descriptor 2, so C-level writes count too).

    python tests/run_train_cases.py CASES.json RESULTS.json

CASES.json: {"name": ["--job.config_file", ...], ...}. Importing torch and torchtitan costs about
10 s of CPU per process; a dozen bad-config cases in one process pay it once."""

import json
import os
import sys
import tempfile

from longctx.launch import run
from longctx.train import main as train_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_case(args: list[str]) -> dict:
    sys.argv = ["train.py", *args]
    with tempfile.TemporaryFile(mode="w+") as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            code = run(train_main, args)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            _destroy_process_group()  # a case that got that far must not leak into the next
        captured.seek(0)
        return {"returncode": code, "stderr": captured.read()}


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(cases_path: str, results_path: str) -> None:
    os.chdir(ROOT)
    with open(cases_path) as f:
        cases = json.load(f)
    results = {name: run_case(args) for name, args in cases.items()}
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
