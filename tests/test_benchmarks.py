"""Every benchmark and probe under benchmarks/ imports against the package as it is now (they run
on a GPU, where a stale import would first show): one interpreter imports them all."""

import glob
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_every_benchmark_imports():
    names = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "benchmarks"), ROOT]))
    result = subprocess.run([sys.executable, "-c", "; ".join(f"import {name}" for name in names)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
