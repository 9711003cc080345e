"""Where a run's weights come from, decided once before the model is built (docs/design.md)."""

import dataclasses
import os
from typing import Literal

from longctx.base import CheckpointError
from longctx.checkpoint.dcp import complete_steps, read_dcp_metadata, resolve_dcp_path


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """Where the weights come from; `weight_source` decides it once, before the model is built."""

    kind: Literal["resume", "hf", "dcp", "seed"]  # "resume": the run's own step, with optimizer, data, RNG
    path: str | None = None  # the step folder, HF folder or DCP folder
    why: str = ""  # the rest of the log line: why this source, what was passed over
    step: int | None = None  # "resume": the last step done
    seed: int = 0
    damaged: tuple[str, ...] = ()  # "resume": newer step folders found damaged; never deleted

    def log_line(self) -> str:
        what = {"resume": f"resuming from the run's own checkpoint {self.path}", "hf": f"Hugging Face checkpoint {self.path}",
                "dcp": f"DCP checkpoint {self.path}, model only", "seed": f"random init, seed {self.seed}"}[self.kind]
        return f"weights: {what}{self.why}"

    def model_only(self) -> "WeightSource":
        """The same weights without the training state (scoring a run's step, not continuing it)."""
        return dataclasses.replace(self, kind="dcp", step=None, damaged=()) if self.kind == "resume" else self



def checkpoint_folder(job_config) -> str:
    return os.path.join(job_config.job.dump_folder, job_config.checkpoint.folder)



def _undamaged_step(folder: str, load_step: int) -> tuple[int | None, dict[str, str]]:
    """The step to resume (None: a fresh start), and the newer complete steps found damaged
    (folder -> the one-line reason). An explicit load_step must be whole; the latest falls back."""
    steps = complete_steps(folder)
    if load_step != -1:
        if load_step not in steps:
            raise CheckpointError(f"checkpoint.load_step={load_step} but {folder}/step-{load_step} is missing or "
                                  f"incomplete; complete steps: {steps or 'none'} (or -1 for the latest)")
        read_dcp_metadata(os.path.join(folder, f"step-{load_step}"))
        return load_step, {}
    damaged = {}
    for step in reversed(steps):
        path = os.path.join(folder, f"step-{step}")
        try:
            read_dcp_metadata(path)
            return step, damaged
        except CheckpointError as e:
            damaged[path] = str(e)
    if damaged:
        raise CheckpointError(f"every complete step in {folder} is damaged; the newest: {next(iter(damaged.values()))}")
    return None, {}



def weight_source(job_config) -> WeightSource:
    """The run's own checkpoint, else checkpoint.initial_load_path, else the seed (see the module
    docstring). Reads only folder listings and DCP metadata: every rank decides the same."""
    ckpt = job_config.checkpoint
    folder = checkpoint_folder(job_config)
    if ckpt.initial_load_in_hf and not ckpt.initial_load_path:
        raise CheckpointError("checkpoint.initial_load_in_hf needs checkpoint.initial_load_path, the HF model folder")
    step, damaged = _undamaged_step(folder, ckpt.load_step) if ckpt.enable else (None, {})
    if step is not None:
        why = f", the newest undamaged step (skipped, kept on disk: {' | '.join(damaged.values())})" if damaged else ""
        why += " (checkpoint.initial_load_path ignored)" if ckpt.initial_load_path else ""
        return WeightSource("resume", os.path.join(folder, f"step-{step}"), why, step=step, damaged=tuple(damaged))
    why = f" ({f'no complete checkpoint in {folder}' if ckpt.enable else 'checkpoint.enable=false'})"
    if ckpt.initial_load_path and ckpt.initial_load_in_hf:
        return WeightSource("hf", ckpt.initial_load_path, why)
    if ckpt.initial_load_path:
        return WeightSource("dcp", resolve_dcp_path(ckpt.initial_load_path), why)
    return WeightSource("seed", why=why[:-1] + ", no checkpoint.initial_load_path)", seed=job_config.debug.seed or 0)

