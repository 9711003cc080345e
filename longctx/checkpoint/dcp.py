"""DCP checkpoints in and out of a (possibly sharded) model: which step folders are complete, the
check of a folder's files, recorded model and tensors against the model before any weight is read,
model-only loads and saves. Damage is one CheckpointError line naming the file; nothing on disk is
touched."""

import dataclasses
import json
import os
import re

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from longctx.base import CheckpointError, global_rank, log
from longctx.checkpoint.files import UNREADABLE, atomic_folder, check_tensors, dcp_error_line, load_checkpoint
from longctx.checkpoint.hf import ASSET_FILES, copy_assets
from longctx.models.common.args import DecoderArgs

# Top-level keys of a training checkpoint that are not model weights (torchtitan's layout: model
# weights flattened at the top, the other states under their own name).
_NON_MODEL = ("optimizer.", "lr_scheduler.", "dataloader.", "train_state.")
# The model a checkpoint holds, beside its weights: DecoderArgs as one JSON string.
MODEL_RECORD = "model_args"


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
    except UNREADABLE as e:
        raise CheckpointError(f"{path}: .metadata is unreadable ({dcp_error_line(e)}); the checkpoint is damaged") from e
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: .metadata holds a {type(metadata).__name__}, not DCP metadata; the checkpoint is damaged")
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


def model_record(args: DecoderArgs) -> dict:
    """The entry a checkpoint records its model in, merged into the state dict it saves."""
    return {MODEL_RECORD: {"json": json.dumps(dataclasses.asdict(args))}}


def read_model_record(path: str, metadata: Metadata) -> dict | None:
    """The DecoderArgs fields a complete DCP folder was saved with (None: saved before models were
    recorded). A few bytes; collective, like every DCP load."""
    if f"{MODEL_RECORD}.json" not in metadata.state_dict_metadata:
        return None
    state = {MODEL_RECORD: {"json": ""}}
    load_checkpoint(state, path)
    return json.loads(state[MODEL_RECORD]["json"])


def model_changes(recorded: dict, args: DecoderArgs) -> list[str]:
    """One "field: X in the checkpoint, Y in this config" per DecoderArgs field that changes what
    the model computes. max_seq_len changes nothing: RoPE angles are computed per position, and
    YaRN's original length is part of rope_scaling."""
    ours = dataclasses.asdict(args)
    return [f"{name}: {_describe(recorded.get(name))} in the checkpoint, {_describe(value)} in this config"
            for name, value in ours.items() if name != "max_seq_len" and recorded.get(name) != value]


def _describe(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict):  # rope_scaling: "yarn factor 4.0 original_max_position_embeddings 32768"
        return " ".join([value["rope_type"], *(f"{k} {v}" for k, v in value.items() if k != "rope_type" and v is not None)])
    return str(value)


def _check_weights(model: nn.Module, path: str, metadata: Metadata) -> None:
    found = {k: (tuple(m.size), m.properties.dtype) for k, m in metadata.state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata) and not k.startswith(_NON_MODEL)}
    expected = {k: tuple(v.shape) for k, v in get_model_state_dict(model).items()}
    check_tensors(path, found, expected, "wrong model family or flavor for this checkpoint?")


def check_dcp_checkpoint(model: nn.Module, path: str) -> None:
    """A resume's check, before any weight is read: the checkpoint holds the model this config
    defines, and its weights fit the model. A resume continues a run; changing the model is a new
    run that starts from the weights (load_dcp_model)."""
    metadata = read_dcp_metadata(path)
    recorded = read_model_record(path, metadata)
    if recorded is None:
        log(f"{path} records no model (saved before checkpoints did): its weights are checked by name and shape only")
    elif changes := model_changes(recorded, model.args):
        raise CheckpointError(
            f"{path} holds another model than this config defines: {'; '.join(changes)}. A resume continues the "
            f"same model: set model.flavor and model.rope_scaling as its run had them, or to change the model start "
            f"a new run from these weights with checkpoint.initial_load_path={path} and another job.dump_folder")
    _check_weights(model, path, metadata)


def load_dcp_model(model: nn.Module, path: str) -> None:
    """Model weights only, from any DCP checkpoint, resharded into this rank's pieces. The model may
    differ from the recorded one where no weight changes shape (e.g. YaRN switched on to extend a
    plain checkpoint): each change is logged."""
    metadata = read_dcp_metadata(path)
    recorded = read_model_record(path, metadata)
    if recorded is not None and (changes := model_changes(recorded, model.args)):
        log(f"{path}: its weights into a changed model: {'; '.join(changes)}")
    _check_weights(model, path, metadata)
    state = get_model_state_dict(model)
    load_checkpoint(state, path)
    set_model_state_dict(model, state)


def save_dcp_model(model: nn.Module, path: str, assets_from: str | None = None) -> None:
    """A model-only DCP checkpoint, keys as in a training checkpoint, with its model record, plus
    the model files of `assets_from` (config.json, tokenizer...); `path` exists only once complete."""
    with atomic_folder(path) as partial:
        dcp.save(get_model_state_dict(model) | model_record(model.args), checkpoint_id=partial)
        if global_rank() == 0:
            copy_assets(assets_from, partial, ("config.json", *ASSET_FILES))
