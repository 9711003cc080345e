#!/usr/bin/env bash
# Install what this repo needs and is missing, into the current Python (a venv or the system one).
#   bash scripts/setup.sh          # what train.py needs (pyproject.toml [project] dependencies) and longctx itself
#   bash scripts/setup.sh --test   # and what the tests need ([project.optional-dependencies] test)
# Already-satisfied packages are left alone: an installed torch >= 2.11 (and its pinned triton)
# stays; a Python without torch gets torch==2.13.0.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
groups="runtime"
if [[ "${1:-}" == "--test" ]]; then groups="runtime test"; fi

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    # Asked for by exact version first: a bare `torch>=2.11` would pull a several-GB CUDA build.
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
if ! "$PYTHON" -c "import tomllib" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet tomli  # Python 3.10 reads pyproject.toml with tomli
fi

# pyproject.toml is the one list of dependencies; nothing here repeats it.
mapfile -t requirements < <("$PYTHON" - "$groups" <<'EOF'
import sys

try:
    import tomllib
except ImportError:
    import tomli as tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for group in sys.argv[1].split():
    print("\n".join(project["dependencies"] if group == "runtime" else project["optional-dependencies"][group]))
EOF
)
"$PYTHON" -m pip install --quiet "${requirements[@]}"
# The package itself, editable: `import longctx` works from any folder and follows this checkout.
"$PYTHON" -m pip install --quiet --no-deps --editable .
"$PYTHON" -c "import torch, torchtitan, longctx; print(f'torch {torch.__version__}, torchtitan {torchtitan.__version__} and longctx ready')"
