"""DCP checkpoints in and out of a (possibly sharded) model, where a run's weights come from, and
the run's own training checkpoints.

Where a run's weights come from is decided once, before the model is built (`weight_source`),
and handed to the builder (components/build.py) and to the `Checkpointer`; one log line says it:
  1. the run's own newest complete, undamaged checkpoint {dump_folder}/{checkpoint.folder}/step-N
     (or checkpoint.load_step), with optimizer, LR schedule, data position, RNG and step;
  2. checkpoint.initial_load_path: an HF folder (initial_load_in_hf) or a DCP folder, model only;
  3. random init from debug.seed.
Every input is checked against the model before any weight is read: a bad one is one line
(CheckpointError) naming the keys, shapes, config fields or damaged file, and nothing on disk is
touched. A damaged step of the run's own is skipped on resume (the newest earlier one is used) and
moved aside, never deleted.

Training checkpoints are torchtitan's CheckpointManager (DCP, async, keep_latest_k); `Checkpointer`
adds complete-only resume, damaged-step handling and the HF exports (components/hf.py).
"""

import dataclasses
import functools
import io
import json
import os
import re
import shutil
from typing import Literal

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torchtitan.components.checkpoint import CheckpointManager

from components.files import CheckpointError, atomic_folder, barrier, check_tensors, dcp_error_line, global_rank, log
from components.hf import ASSET_FILES, copy_assets, export_hf

# ---------------------------------------------------------------- DCP

# Top-level keys of a training checkpoint that are not model weights (CheckpointManager's layout:
# model weights flattened at the top, the other states under their own name).
_NON_MODEL = ("optimizer.", "lr_scheduler.", "dataloader.", "train_state.")


def is_complete(step_folder: str) -> bool:
    """DCP writes `.metadata` last (to a temp name, fsynced, then renamed) after every rank's data
    files: its presence means the whole checkpoint is on disk, at any moment of a killed save."""
    return os.path.isfile(os.path.join(step_folder, ".metadata"))


def list_steps(folder: str) -> dict[int, str]:
    """step -> step-N folder, complete or not."""
    if not os.path.isdir(folder):
        return {}
    matches = ((re.fullmatch(r"step-(\d+)", name), name) for name in os.listdir(folder))
    return {int(m.group(1)): os.path.join(folder, name) for m, name in matches if m}


def complete_steps(folder: str) -> list[int]:
    return sorted(step for step, path in list_steps(folder).items() if is_complete(path))


def latest_step(folder: str) -> int | None:
    return max(complete_steps(folder), default=None)


def resolve_dcp_path(path: str) -> str:
    """A DCP step folder, or a checkpoint folder of step-N subfolders (its latest complete one)."""
    if is_complete(path):
        return path
    step = latest_step(path)
    if step is None:
        raise CheckpointError(f"{path!r} is not a complete DCP checkpoint (no .metadata) and holds no complete step-N folder")
    return os.path.join(path, f"step-{step}")


def read_dcp_metadata(path: str):
    """A complete DCP folder's metadata, after checking that every data file it names is there and
    as long as the byte ranges it records: a damaged folder (a copy cut short, a disk that filled,
    bit rot in `.metadata`) is one line naming the file. Damage inside a file of the right length
    goes unseen: DCP stores no checksums."""
    try:
        metadata = FileSystemReader(path).read_metadata()
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"{path}: .metadata is unreadable ({dcp_error_line(e)}); the checkpoint is damaged") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        have = os.path.getsize(file) if os.path.isfile(file) else None
        if have is None or have < size:
            state = "is missing" if have is None else f"is truncated ({have} of {size} bytes)"
            raise CheckpointError(f"{path}: {name} {state}; the checkpoint is damaged")
    return metadata


def check_dcp_checkpoint(model: nn.Module, path: str) -> None:
    """The model weights of a DCP checkpoint (training or model-only) against the model."""
    metadata = read_dcp_metadata(path).state_dict_metadata
    found = {k: (tuple(m.size), m.properties.dtype) for k, m in metadata.items()
             if isinstance(m, TensorStorageMetadata) and not k.startswith(_NON_MODEL)}
    expected = {k: tuple(v.shape) for k, v in get_model_state_dict(model).items()}
    check_tensors(path, found, expected, "wrong model family or flavor for this checkpoint?")


def load_dcp_model(model: nn.Module, path: str) -> None:
    """Model weights only, from any DCP checkpoint, resharded into this rank's pieces."""
    check_dcp_checkpoint(model, path)
    state = get_model_state_dict(model)
    try:
        dcp.load(state, checkpoint_id=path)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise CheckpointError(f"cannot load {path}: {dcp_error_line(e)}") from None
    set_model_state_dict(model, state)


def save_dcp_model(model: nn.Module, path: str, assets_from: str | None = None) -> None:
    """A model-only DCP checkpoint, keys as in a training checkpoint, plus the model files of
    `assets_from` (config.json, tokenizer...); `path` exists only once complete."""
    with atomic_folder(path) as partial:
        dcp.save(get_model_state_dict(model), checkpoint_id=partial)
        if global_rank() == 0:
            copy_assets(assets_from, partial, ("config.json", *ASSET_FILES))


# ---------------------------------------------------------------- where the weights come from


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
    if ckpt.initial_load_path and not ckpt.initial_load_model_only:
        raise CheckpointError("checkpoint.initial_load_model_only=false is not supported; to resume a run, "
                              f"copy its step-N folder into {folder}")
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


# ---------------------------------------------------------------- training checkpoints


class TrainState(Stateful):
    """The step and the RNG states. No step draws random numbers today; dropout or sampling would."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        buffer = io.BytesIO()
        torch.save(rng, buffer)  # one opaque entry: a CPU checkpoint resumes on GPU and back
        return {"step": torch.tensor(self.step), "rng": buffer}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        state["rng"].seek(0)  # DCP round-trips the BytesIO object itself
        rng = torch.load(state["rng"], weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


class LoaderState(Stateful):
    """The data position as one JSON string: every rank packs the same global stream, so one copy
    serves any dp degree on resume, and its nested lists are not flattened into DCP keys."""

    def __init__(self, loader):
        self.loader = loader

    def state_dict(self) -> dict:
        return {"json": json.dumps(self.loader.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(json.loads(state["json"]))


@functools.cache
def _stager_closes_itself() -> bool:
    """Whether this torch's DefaultStager fails at its second stage (see Checkpointer._drop_closed_stager).
    Asked of the behaviour, not the version number: the fix may be backported."""
    stager = DefaultStager(StagingOptions(False, False, False, False))  # CPU copies, this thread: no CUDA, no pool
    try:
        stager.stage({"x": torch.zeros(1)})
        stager.stage({"x": torch.zeros(1)})
        return False
    except KeyError:
        return True
    finally:
        stager.close()


class Checkpointer:
    """save(step) after every step; resume() once before the loop. HF exports go to
    {dump_folder}/hf/step-N every checkpoint.export_interval steps and, with last_save_in_hf, at the end."""

    def __init__(self, job_config, model, optimizers, lr_schedulers, loader, spec, model_args, source: WeightSource):
        ckpt = job_config.checkpoint  # keep_latest_k=1 is refused at config time (components/config.py)
        self.job_config, self.model, self.spec, self.model_args, self.source = job_config, model, spec, model_args, source
        self.folder = checkpoint_folder(job_config)
        self.train_state = TrainState()
        self.stale: set[int] = set()
        # The manager does what it does well: DCP save/load, async, keep_latest_k. Initial loads
        # are ours (checked, explicit precedence), and the last save is a full one so that a
        # finished run resumes or extends; HF goes to its own folder, never among step-N.
        config = dataclasses.replace(ckpt, initial_load_path=None, initial_load_in_hf=False,
                                     last_save_model_only=False, last_save_in_hf=False)
        self.manager = CheckpointManager(LoaderState(loader), [model], optimizers, lr_schedulers,
                                         {"train_state": self.train_state}, config, sd_adapter=None,
                                         base_folder=job_config.job.dump_folder)

    def resume(self) -> int:
        """Loads the run's own checkpoint if the weight source is one; returns the last step done."""
        ckpt = self.job_config.checkpoint
        start = self.source.step or 0
        # Folders past the resumed step belong to an abandoned future. Damaged ones move aside, out
        # of reach of keep_latest_k and of the save that reuses their name. Incomplete ones (a
        # killed save) go now, so keep_latest_k never counts them; complete ones (a run rewound
        # with load_step) go when the run reaches their step, before that step is written again,
        # so no half-overwritten folder keeps an old `.metadata`.
        if ckpt.enable and not ckpt.load_only:
            self._move_damaged(self.source.damaged)
            later = {s: p for s, p in list_steps(self.folder).items() if s > start}
            self._remove([p for p in later.values() if not is_complete(p)])
            self.stale = {s for s, p in later.items() if is_complete(p)}
        if self.source.kind != "resume":
            return 0
        try:
            self.manager.load(self.source.step)
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            raise CheckpointError(f"cannot resume from {self.source.path}: {dcp_error_line(e)}") from None
        return self.train_state.step

    def save(self, step: int, last_step: bool = False, now: bool = False) -> None:
        """now: whatever checkpoint.interval says, and synchronously (a preempted run's last save)."""
        self.train_state.step = step
        self._drop_closed_stager()
        if step in self.stale:
            self._remove([os.path.join(self.folder, f"step-{step}")])
            self.stale.discard(step)
        self.manager.save(step, last_step=last_step or now)
        ckpt = self.job_config.checkpoint
        if (ckpt.export_interval > 0 and step % ckpt.export_interval == 0) or (last_step and ckpt.last_save_in_hf):
            self.export(os.path.join(self.job_config.job.dump_folder, "hf", f"step-{step}"))

    def export(self, out_dir: str) -> None:
        ckpt = self.job_config.checkpoint
        export_hf(self.model, self.spec, self.model_args, out_dir, ckpt.export_dtype,
                  self.job_config.model.hf_assets_path, ckpt.export_max_shard_gb, overwrite=True)

    def _move_damaged(self, paths: tuple[str, ...]) -> None:
        """Into {folder}/damaged/ (whose name matches no step pattern: torchtitan's keep_latest_k
        purge searches for `step-N` in names), for the user to inspect; never deleted."""
        barrier()
        if global_rank() == 0:
            for path in paths:
                target, n = os.path.join(self.folder, "damaged", os.path.basename(path)), 1
                while os.path.exists(target):
                    n += 1
                    target = os.path.join(self.folder, "damaged", f"{os.path.basename(path)}.{n}")
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.rename(path, target)
                log(f"checkpoint: moved the damaged {path} to {target}")
        barrier()

    def _remove(self, paths: list[str]) -> None:
        """Collective: every rank listed the folders before rank 0 deletes any."""
        barrier()
        if global_rank() == 0:
            for path in paths:
                metadata = os.path.join(path, ".metadata")
                if os.path.exists(metadata):
                    os.remove(metadata)  # first: a kill during rmtree must not leave a "complete" folder
                shutil.rmtree(path, ignore_errors=True)
        barrier()

    def _drop_closed_stager(self) -> None:
        """async_with_pinned_mem: torchtitan builds one DefaultStager and stages every save with it,
        but torch 2.11's stager closes its deep copier at the end of each stage (pytorch#170431), so
        the next save dies in it with `KeyError: <class 'type'>` (pytorch#183413; 2.13 keeps it open,
        pytorch#183424). Under such a torch, once a save is staged its stager is closed (which also
        ends its staging thread) and dropped: torchtitan builds a new one at the next save. Cost: new
        pinned buffers every save, which that torch allocates anyway (the close released the old)."""
        if self.manager.enable_staging and self.manager.stager is not None and _stager_closes_itself():
            self.manager.maybe_wait_for_staging()
            self.manager.stager.close()
            self.manager.stager = None

    def maybe_wait_for_staging(self) -> None:
        """Before the optimizer step: async_with_pinned_mem may still be copying the weights to host."""
        self.manager.maybe_wait_for_staging()

    def close(self) -> None:
        if self.manager.enable:
            self.manager._async_wait()  # a save in flight ends before the process group does; close() leaves it
        self.manager.close()
