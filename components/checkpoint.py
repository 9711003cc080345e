"""Checkpoints in and out of a (possibly sharded) model.

Where a run's weights come from, in this order, said in one log line (`init_weights`):
  1. the run's own latest COMPLETE checkpoint in {dump_folder}/{checkpoint.folder}/step-N
     (or checkpoint.load_step), with optimizer, LR schedule, data position, RNG and step;
  2. checkpoint.initial_load_path: an HF folder (initial_load_in_hf) or a DCP folder, model only;
  3. random init from debug.seed.
Every input is checked against the model before any weight is read: a bad one is one line
(CheckpointError) naming the keys, shapes or config fields, and nothing on disk is touched.

Training checkpoints are torchtitan's CheckpointManager (DCP, async, keep_latest_k); `Checkpointer`
adds the precedence, the checks, complete-only resume and the HF export (components/hf_export.py).
"""

import dataclasses
import io
import json
import os
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, HuggingFaceStorageReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torchtitan.components.checkpoint import CheckpointManager

from models.common.args import DecoderArgs, args_from_hf_config


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message is one line naming keys/paths."""


def _brief(names) -> str:
    names = sorted(names)
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _one_line(error: Exception) -> str:
    """DCP wraps per-rank tracebacks into one exception; keep its last meaningful line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.startswith(" ")]
    return (lines[-1] if lines else type(error).__name__)[:300]


# Floating dtypes are converted on load (Qwen ships bf16; training keeps fp32 weights); anything
# else is a quantized checkpoint whose values would be silently wrong after a cast.
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", torch.float64, torch.float32, torch.float16, torch.bfloat16}


def _check_tensors(path: str, found: dict, expected: dict[str, tuple], where: str) -> None:
    """found: name -> (shape, dtype) in the checkpoint; expected: name -> shape of the model."""
    missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
    if missing:
        raise CheckpointError(f"{path}: missing keys {_brief(missing)} ({where})")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys {_brief(unexpected)} ({where})")
    wrong = [f"{n} {found[n][0]} vs model {expected[n]}" for n in sorted(expected) if found[n][0] != expected[n]]
    if wrong:
        raise CheckpointError(f"{path}: shape mismatch: {'; '.join(wrong[:3])} ({where})")
    bad = [f"{n} is {found[n][1]}" for n in sorted(found) if found[n][1] not in _FLOAT_DTYPES]
    if bad:
        raise CheckpointError(f"{path}: dtype mismatch: {'; '.join(bad[:3])}; only float checkpoints load (dequantize first)")


# ---------------------------------------------------------------- Hugging Face in


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors")) if os.path.isdir(path) else []
    if not names:
        raise CheckpointError(f"no *.safetensors files in {path!r}; expected an HF model folder")
    return [os.path.join(path, n) for n in names]


def read_hf_shapes(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from the safetensors headers (no tensor data is read). safetensors
    refuses a file shorter than its header says, so this also catches truncated files."""
    shapes = {}
    for file in _safetensors_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    shapes[name] = (tuple(sl.get_shape()), sl.get_dtype())
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise CheckpointError(f"cannot read {file}: {' '.join(str(e).split())[:200]} (truncated or not safetensors?)") from None
    return shapes


def check_hf_config(spec, model_args: DecoderArgs, path: str) -> None:
    """config.json (when the folder has one) must name our family and the model's dimensions."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return  # weights only: the key and shape checks still run
    with open(file) as f:
        cfg = json.load(f)
    architectures = cfg.get("architectures") or [spec.hf_architecture]
    if cfg.get("model_type") != spec.name or spec.hf_architecture not in architectures:
        raise CheckpointError(
            f"{file}: model_type={cfg.get('model_type')!r} architectures={architectures} but model.name={spec.name!r} "
            f"expects {spec.hf_architecture}; set model.name to the checkpoint's family or load a {spec.name} checkpoint"
        )
    try:
        theirs = args_from_hf_config(cfg, **spec.family_flags)
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from None
    # max_seq_len only bounds RoPE positions we compute on the fly; it may differ.
    differ = [f"{f.name} {getattr(theirs, f.name)} vs {getattr(model_args, f.name)}" for f in dataclasses.fields(DecoderArgs)
              if f.name != "max_seq_len" and getattr(theirs, f.name) != getattr(model_args, f.name)]
    if differ:
        raise CheckpointError(f"{file} disagrees with model.flavor (config.json vs flavor): {'; '.join(differ)}; "
                              "set model.flavor to the checkpoint folder to take its dimensions")


def check_hf_checkpoint(adapter, model: nn.Module, path: str) -> None:
    """Refuse missing/unexpected keys, shape and dtype mismatches before any weight is read."""
    found = read_hf_shapes(path)
    expected = {name: tuple(t.shape) for name, t in adapter.to_hf(model.state_dict()).items()}
    if adapter.args.tie_embeddings:
        found.pop("lm_head.weight", None)  # some tied checkpoints store it anyway
    _check_tensors(path, found, expected, "wrong model family or flavor? does config.json match model.flavor?")


def load_hf_weights(model: nn.Module, adapter, path: str) -> None:
    """Each rank reads only its own shards of each tensor (DCP's HF reader, resharding on load)."""
    check_hf_checkpoint(adapter, model, path)
    hf_state = adapter.to_hf(get_model_state_dict(model))
    dcp.load(hf_state, storage_reader=HuggingFaceStorageReader(path))
    set_model_state_dict(model, adapter.from_hf(hf_state))


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


def latest_step(folder: str) -> int | None:
    complete = [step for step, path in list_steps(folder).items() if is_complete(path)]
    return max(complete, default=None)


def resolve_dcp_path(path: str) -> str:
    """A DCP step folder, or a checkpoint folder of step-N subfolders (its latest complete one)."""
    if is_complete(path):
        return path
    step = latest_step(path)
    if step is None:
        raise CheckpointError(f"{path!r} is not a complete DCP checkpoint (no .metadata) and holds no complete step-N folder")
    return os.path.join(path, f"step-{step}")


def check_dcp_checkpoint(model: nn.Module, path: str) -> None:
    """The model weights of a DCP checkpoint (training or model-only) against the model."""
    metadata = FileSystemReader(path).read_metadata().state_dict_metadata
    found = {k: (tuple(m.size), m.properties.dtype) for k, m in metadata.items()
             if isinstance(m, TensorStorageMetadata) and not k.startswith(_NON_MODEL)}
    expected = {k: tuple(v.shape) for k, v in get_model_state_dict(model).items()}
    _check_tensors(path, found, expected, "wrong model family or flavor for this checkpoint?")


def load_dcp_model(model: nn.Module, path: str) -> None:
    """Model weights only, from any DCP checkpoint, resharded into this rank's pieces."""
    check_dcp_checkpoint(model, path)
    state = get_model_state_dict(model)
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as e:  # DCP raises CheckpointException with every rank's traceback
        raise CheckpointError(f"cannot load {path}: {_one_line(e)}") from None
    set_model_state_dict(model, state)


def save_dcp_model(model: nn.Module, path: str) -> None:
    """A model-only DCP checkpoint, keys as in a training checkpoint; written to `path.partial`
    and renamed, so `path` exists only once complete."""
    partial = path.rstrip("/") + ".partial"
    if global_rank() == 0 and os.path.exists(partial):
        shutil.rmtree(partial)
    barrier()
    dcp.save(get_model_state_dict(model), checkpoint_id=partial)
    if global_rank() == 0:
        os.rename(partial, path)
    barrier()


def global_rank() -> int:
    """This process's rank; 0 without a process group (the checks and helpers also run outside one)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------- precedence


def checkpoint_folder(job_config) -> str:
    return os.path.join(job_config.job.dump_folder, job_config.checkpoint.folder)


def resume_step(job_config) -> int | None:
    """The step of the run's own checkpoint to resume from, or None for a fresh start."""
    ckpt = job_config.checkpoint
    if not ckpt.enable:
        return None
    folder = checkpoint_folder(job_config)
    if ckpt.load_step == -1:
        return latest_step(folder)
    if not is_complete(os.path.join(folder, f"step-{ckpt.load_step}")):
        found = sorted(s for s, p in list_steps(folder).items() if is_complete(p))
        raise CheckpointError(f"checkpoint.load_step={ckpt.load_step} but {folder}/step-{ckpt.load_step} is missing or "
                              f"incomplete; complete steps: {found or 'none'} (or -1 for the latest)")
    return ckpt.load_step


def init_weights(model: nn.Module, spec, model_args: DecoderArgs, job_config) -> str:
    """Fill a materialized (to_empty) model by the precedence above; returns the one log line.
    When resuming, weights are checked here and read with the rest in Checkpointer.resume."""
    ckpt = job_config.checkpoint
    folder = checkpoint_folder(job_config)
    step = resume_step(job_config)
    if step is not None:
        check_dcp_checkpoint(model, os.path.join(folder, f"step-{step}"))
        skipped = " (checkpoint.initial_load_path ignored)" if ckpt.initial_load_path else ""
        return f"weights: resuming from the run's own checkpoint {folder}/step-{step}{skipped}"
    source = f"no complete checkpoint in {folder}" if ckpt.enable else "checkpoint.enable=false"
    if ckpt.initial_load_in_hf and not ckpt.initial_load_path:
        raise CheckpointError("checkpoint.initial_load_in_hf needs checkpoint.initial_load_path, the HF model folder")
    if ckpt.initial_load_path:
        if not ckpt.initial_load_model_only:
            raise CheckpointError("checkpoint.initial_load_model_only=false is not supported; to resume a run, "
                                  f"copy its step-N folder into {folder}")
        if ckpt.initial_load_in_hf:
            check_hf_config(spec, model_args, ckpt.initial_load_path)
            load_hf_weights(model, spec.state_dict_adapter(model_args), ckpt.initial_load_path)
            return f"weights: Hugging Face checkpoint {ckpt.initial_load_path} ({source})"
        path = resolve_dcp_path(ckpt.initial_load_path)
        load_dcp_model(model, path)
        return f"weights: DCP checkpoint {path}, model only ({source})"
    model.init_weights(seed=job_config.debug.seed or 0)
    return f"weights: random init, seed {job_config.debug.seed or 0} ({source}, no checkpoint.initial_load_path)"


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


class Checkpointer:
    """save(step) after every step; resume() once before the loop. HF exports go to
    {dump_folder}/hf/step-N every checkpoint.export_interval steps and, with last_save_in_hf, at the end."""

    def __init__(self, job_config, model, optimizers, lr_schedulers, loader, spec, model_args):
        ckpt = job_config.checkpoint
        if ckpt.enable and ckpt.keep_latest_k == 1:
            raise CheckpointError("checkpoint.keep_latest_k=1 would leave no complete checkpoint while the next one "
                                  "is written; use 0 (keep all) or >= 2")
        self.job_config, self.model, self.spec, self.model_args = job_config, model, spec, model_args
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
        """Loads the run's own checkpoint if init_weights chose it; returns the last step done."""
        ckpt = self.job_config.checkpoint
        step = resume_step(self.job_config)  # None when checkpoint.enable is false
        start = 0 if step is None else step
        # Folders past the resumed step belong to an abandoned future. Incomplete ones (a killed
        # save) go now, so keep_latest_k never counts them; complete ones (a run rewound with
        # load_step) go when the run reaches their step, before that step is written again, so
        # no half-overwritten folder keeps an old `.metadata`.
        if ckpt.enable and not ckpt.load_only:
            later = {s: p for s, p in list_steps(self.folder).items() if s > start}
            self._remove([p for p in later.values() if not is_complete(p)])
            self.stale = {s for s, p in later.items() if is_complete(p)}
        if step is None:
            return 0
        try:
            self.manager.load(step)
        except Exception as e:
            raise CheckpointError(f"cannot resume from {self.folder}/step-{step}: {_one_line(e)}") from None
        return self.train_state.step

    def save(self, step: int, last_step: bool = False) -> None:
        self.train_state.step = step
        if step in self.stale:
            self._remove([os.path.join(self.folder, f"step-{step}")])
            self.stale.discard(step)
        self.manager.save(step, last_step=last_step)
        ckpt = self.job_config.checkpoint
        if (ckpt.export_interval > 0 and step % ckpt.export_interval == 0) or (last_step and ckpt.last_save_in_hf):
            self.export(os.path.join(self.job_config.job.dump_folder, "hf", f"step-{step}"))

    def export(self, out_dir: str) -> None:
        from components.hf_export import export_hf  # local: keeps HF export out of load-only imports

        ckpt = self.job_config.checkpoint
        export_hf(self.model, self.spec, self.model_args, out_dir, ckpt.export_dtype,
                  self.job_config.model.hf_assets_path, ckpt.export_max_shard_gb, overwrite=True)

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

    def close(self) -> None:
        self.manager.close()
