"""The import rules of docs/design.md ("Layers"), read off the source: every `import` and `from ...
import` of the package, the scripts and the benchmarks, at module level or inside a function.
A new import that breaks a rule fails here, naming the file, the line and the rule."""

import ast
import os
from collections import defaultdict

import pytest

from tests.conftest import ROOT

# Who may import whom inside longctx (besides itself): the layer of a module is its first package
# under longctx/ (or the module's own name for longctx/*.py).
MAY_IMPORT = {
    "base": set(),
    "config": {"base"},
    "parallelisms": {"base"},
    "models": {"base", "parallelisms"},
    "data": {"base"},
    "recipes": {"base", "data", "models"},
    "checkpoint": {"base", "models"},
    "planner": {"base", "models", "parallelisms"},
    "optim": {"base"},
    # What the commands share: any layer below, and each other without a cycle.
    "modeling": {"base", "config", "parallelisms", "models", "checkpoint"},
    "launch": {"base", "config", "parallelisms", "models", "data", "recipes", "modeling", "planner", "profiling", "validation"},
    "metrics": {"base"},
    "profiling": {"base", "config"},
    "validation": {"base", "config", "data", "recipes"},
    "train": {"base", "config", "parallelisms", "models", "data", "recipes", "checkpoint", "planner", "launch", "modeling",
              "metrics", "optim", "profiling", "validation"},
}
# Layers that never see a job config object (they take the values they need as arguments).
NO_JOB_CONFIG = ("models", "parallelisms", "data", "planner")


def sources(folder: str):
    for root, _, files in os.walk(os.path.join(ROOT, folder)):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(root, name), ROOT)


def module_name(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def imports(path: str):
    """(line, imported module) of every absolute import in the file, at any depth."""
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            # `from longctx import train` imports the module longctx.train
            yield from ((node.lineno, f"{node.module}.{alias.name}") for alias in node.names if node.module == "longctx")


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "longctx" and len(parts) > 1 else None


PACKAGE = list(sources("longctx"))


def test_every_layer_is_known():
    assert {layer(module_name(p)) for p in PACKAGE if layer(module_name(p))} == set(MAY_IMPORT)


@pytest.mark.parametrize("path", PACKAGE)
def test_package_imports_follow_the_layers(path):
    own = layer(module_name(path))
    if own is None:
        return  # longctx/__init__.py: a docstring
    broken = [f"{path}:{line} imports {module} ({own} may import {sorted(MAY_IMPORT[own]) or 'nothing of longctx'})"
              for line, module in imports(path)
              if layer(module) not in (None, own) and layer(module) not in MAY_IMPORT[own]]
    assert not broken, "\n".join(broken)


def test_no_import_cycle_between_modules():
    graph = defaultdict(set)
    names = {module_name(p) for p in PACKAGE}
    for path in PACKAGE:
        for _, module in imports(path):
            if module in names and module != module_name(path):
                graph[module_name(path)].add(module)

    def reaches(start: str, target: str, seen: set) -> bool:
        return any(nxt == target or (nxt not in seen and not seen.add(nxt) and reaches(nxt, target, seen))
                   for nxt in graph[start])

    cycles = sorted(m for m in names if reaches(m, m, set()))
    assert not cycles, f"modules on an import cycle: {cycles}"


@pytest.mark.parametrize("folder", NO_JOB_CONFIG)
def test_lower_layers_never_see_a_job_config(folder):
    seen = [f"{path}:{node.lineno}" for path in sources(f"longctx/{folder}")
            for node in ast.walk(ast.parse(open(os.path.join(ROOT, path)).read()))
            if isinstance(node, (ast.Name, ast.arg)) and getattr(node, "id", getattr(node, "arg", None)) == "job_config"]
    assert not seen, f"longctx/{folder} takes values as arguments, never the job config: {seen}"


@pytest.mark.parametrize("folder", ["scripts", "benchmarks"])
def test_commands_import_the_package_not_each_other(folder):
    """Scripts are thin commands over longctx; only benchmarks time the training loop itself
    (longctx.train) and share one module of compared systems (bench_systems)."""
    local = {os.path.basename(p).removesuffix(".py") for p in sources(folder)}
    broken = []
    for path in sources(folder):
        for line, module in imports(path):
            top = module.split(".")[0]
            if top in ("scripts", "benchmarks", "tests") or (top in local and module != "bench_systems"):
                broken.append(f"{path}:{line} imports {module}")
            if folder == "scripts" and module == "longctx.train":
                broken.append(f"{path}:{line} imports the training loop")
    assert not broken, "\n".join(broken)


def loaded_by(modules: list[str], prefixes: tuple[str, ...]) -> list[str]:
    """The modules whose names start with one of prefixes that importing modules loads, in a fresh
    interpreter (this one has imported everything already)."""
    import subprocess
    import sys

    code = f"import sys, {', '.join(modules)}; print(sorted(m for m in sys.modules if m.startswith({prefixes!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return ast.literal_eval(out)


def test_the_data_pipeline_loads_without_models_or_torchtitan():
    """Importing the CPU data side (for IGNORE_INDEX, a loader, a stream) pulls in no model code,
    no parallelism and no torchtitan."""
    data_side = ["longctx.data.loader", "longctx.data.packing", "longctx.data.token_shards", "longctx.data.chat", "longctx.base"]
    assert loaded_by(data_side, ("longctx.models", "longctx.parallelisms", "torchtitan")) == []


def test_training_runs_without_torchtitan_or_triton():
    """train.py, the models and their HF adapters import neither torchtitan (the benchmarks'
    comparison only) nor triton: 1.4 s less per rank at start-up."""
    training = ["longctx.train", "longctx.modeling", "longctx.checkpoint.hf", "longctx.models.qwen2", "longctx.models.qwen3"]
    assert loaded_by(training, ("torchtitan", "triton")) == []
