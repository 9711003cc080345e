"""Hugging Face safetensors into a sharded model: checked first, then read straight into DTensors."""

import json
import os

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message is one line naming keys/paths."""


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
    """name -> (shape, dtype) from the safetensors headers (no tensor data is read)."""
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


def _brief(names) -> str:
    names = sorted(names)
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def check_hf_checkpoint(adapter, model: nn.Module, path: str) -> None:
    """Refuse missing/unexpected keys and shape mismatches before any weight is read."""
    found = read_hf_shapes(path)
    expected = {name: tuple(t.shape) for name, t in adapter.to_hf(model.state_dict()).items()}
    if adapter.args.tie_embeddings:
        found.pop("lm_head.weight", None)  # some tied checkpoints store it anyway
    missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
    if missing:
        raise CheckpointError(f"{path}: missing keys {_brief(missing)} (wrong model family or flavor?)")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys {_brief(unexpected)} (wrong model family or flavor?)")
    wrong = [f"{n} {found[n][0]} vs model {expected[n]}" for n in sorted(expected) if found[n][0] != expected[n]]
    if wrong:
        raise CheckpointError(f"{path}: shape mismatch: {'; '.join(wrong[:3])} (does config.json match model.flavor?)")


def load_hf_weights(model: nn.Module, adapter, path: str) -> None:
    """Each rank reads only its own shards of each tensor (DCP's HF reader, resharding on load)."""
    check_hf_checkpoint(adapter, model, path)
    hf_state = adapter.to_hf(get_model_state_dict(model))
    dcp.load(hf_state, storage_reader=HuggingFaceStorageReader(path))
    set_model_state_dict(model, adapter.from_hf(hf_state))
