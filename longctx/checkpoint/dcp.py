"""DCP checkpoints in and out of a (possibly sharded) model: which step folders are complete, the
check of a folder's files and tensors against the model before any weight is read, model-only
loads and saves. Damage is one CheckpointError line naming the file; nothing on disk is touched."""

import os
import re

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from longctx.base import CheckpointError, global_rank
from longctx.checkpoint.files import atomic_folder, check_tensors, dcp_error_line
from longctx.checkpoint.hf import ASSET_FILES, copy_assets

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


# ---------------------------------------------------------------- training checkpoints


