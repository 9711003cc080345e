"""Hugging Face model folders in and out: read, check against the model, load into the sharded
model, export from it.

In: each rank reads only its own pieces of each tensor (DCP's HF reader, resharding on load),
after the safetensors headers and config.json have been checked against the model.
Out: model-0000K-of-0000N.safetensors + model.safetensors.index.json + config.json +
generation_config.json (+ tokenizer files when the run's hf_assets_path has them), a folder that
transformers and vLLM open. Every rank joins the gather of one tensor at a time
(DTensor.full_tensor); only rank 0 holds the gathered tensors of the shard file being written,
never the whole model. The folder appears complete or not at all (files.atomic_folder).
"""

import dataclasses
import json
import os
import shutil

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor

from longctx.base import CheckpointError, ConfigError, global_rank, pack_greedy
from longctx.checkpoint.files import atomic_folder, check_tensors, load_checkpoint, refuse_existing
from longctx.models.common.args import DecoderArgs, args_from_hf_config, args_to_hf_config, read_hf_config

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# Copied next to the weights when the source folder has them: what a model folder needs beside
# config.json to generate (sampling defaults, stop tokens) and to tokenize.
ASSET_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
               "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def copy_assets(src: str | None, dst: str, names=ASSET_FILES) -> None:
    for name in names:
        if src and os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), dst)


# ---------------------------------------------------------------- in


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
        except (OSError, SafetensorError) as e:  # a truncated file or another format: SafetensorError
            raise CheckpointError(f"cannot read {file}: {' '.join(str(e).split())[:200]} (truncated or not safetensors?)") from e
    return shapes


def check_hf_config(spec, model_args: DecoderArgs, path: str) -> None:
    """config.json (when the folder has one) must name our family and the model's dimensions."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return  # weights only: the key and shape checks still run
    cfg = read_hf_config(file)  # a ConfigError naming the file when unreadable
    architectures = cfg.get("architectures") or [spec.hf_architecture]
    if cfg.get("model_type") != spec.name or spec.hf_architecture not in architectures:
        raise CheckpointError(
            f"{file}: model_type={cfg.get('model_type')!r} architectures={architectures} but model.name={spec.name!r} "
            f"expects {spec.hf_architecture}; set model.name to the checkpoint's family or load a {spec.name} checkpoint"
        )
    try:
        theirs = args_from_hf_config(cfg, **spec.family_flags)
    except ConfigError as e:  # its message does not name the file
        raise CheckpointError(f"{file}: {e}") from e
    # max_seq_len only bounds RoPE positions we compute on the fly, and rope scaling changes no
    # weight (extending a base model turns it on in the TOML): both may differ.
    differ = [f"{f.name} {getattr(theirs, f.name)} vs {getattr(model_args, f.name)}" for f in dataclasses.fields(DecoderArgs)
              if f.name not in ("max_seq_len", "rope_scaling") and getattr(theirs, f.name) != getattr(model_args, f.name)]
    if differ:
        raise CheckpointError(f"{file} disagrees with model.flavor (config.json vs flavor): {'; '.join(differ)}; "
                              "set model.flavor to the checkpoint folder to take its dimensions")


def check_hf_checkpoint(adapter, model: nn.Module, path: str) -> None:
    """Refuse missing/unexpected keys, shape and dtype mismatches before any weight is read."""
    found = read_hf_shapes(path)
    expected = {name: tuple(t.shape) for name, t in adapter.to_hf(model.state_dict()).items()}
    if adapter.args.tie_embeddings:
        found.pop("lm_head.weight", None)  # some tied checkpoints store it anyway
    check_tensors(path, found, expected, "wrong model family or flavor? does config.json match model.flavor?")


def load_hf_weights(model: nn.Module, adapter, path: str) -> None:
    """Each rank reads only its own shards of each tensor (DCP's HF reader, resharding on load)."""
    check_hf_checkpoint(adapter, model, path)
    hf_state = adapter.to_hf(get_model_state_dict(model))
    load_checkpoint(hf_state, path, storage_reader=HuggingFaceStorageReader(path))
    set_model_state_dict(model, adapter.from_hf(hf_state))


# ---------------------------------------------------------------- out


def hf_config(spec, model_args, dtype: torch.dtype, eos_token_id: int | None) -> dict:
    cfg = {"architectures": [spec.hf_architecture], "model_type": spec.name, **args_to_hf_config(model_args),
           "torch_dtype": str(dtype).removeprefix("torch.")}
    if eos_token_id is not None:
        cfg["eos_token_id"] = eos_token_id
    return cfg


def _eos_token_id(assets_path: str | None) -> int | None:
    """The EOS of the model folder the run took its tokenizer from (its config.json), if it has one."""
    if not assets_path or not os.path.isfile(os.path.join(assets_path, "config.json")):
        return None
    try:
        return read_hf_config(assets_path).get("eos_token_id")
    except ConfigError:
        return None  # an unreadable config.json there is not the export's business


def plan_shards(shapes: dict[str, torch.Size], itemsize: int, max_bytes: float) -> list[list[str]]:
    """Names per file, in model order; a file closes when the next tensor would overflow it (a
    tensor larger than max_bytes gets a file of its own)."""
    names = list(shapes)
    files = pack_greedy([shapes[name].numel() * itemsize for name in names], max_bytes)
    return [[names[i] for i in indices] for indices in files]


def _write_side_files(out: str, spec, model_args, dtype, assets_path: str | None) -> None:
    eos = _eos_token_id(assets_path)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config(spec, model_args, dtype, eos), f, indent=2)
    copy_assets(assets_path, out)  # a real model's generation config, and the tokenizer
    if not os.path.isfile(os.path.join(out, "generation_config.json")):
        with open(os.path.join(out, "generation_config.json"), "w") as f:
            json.dump({} if eos is None else {"eos_token_id": eos}, f, indent=2)


def export_hf(model, spec, model_args, out_dir: str, dtype: str, assets_path: str | None = None,
              max_shard_gb: float = 5.0, overwrite: bool = False) -> None:
    """Collective over all ranks of the model's mesh; rank 0 writes."""
    if dtype not in DTYPES:
        raise CheckpointError(f"export dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if not overwrite:
        refuse_existing(out_dir)
    torch_dtype = DTYPES[dtype]
    rank0 = global_rank() == 0
    hf_state = spec.state_dict_adapter(model_args).to_hf(get_model_state_dict(model))
    shards = plan_shards({n: t.shape for n, t in hf_state.items()}, torch_dtype.itemsize, max_shard_gb * 1e9)
    with atomic_folder(out_dir) as partial:
        weight_map, total = {}, 0
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in names:
                value = hf_state[name]
                full = value.full_tensor() if isinstance(value, DTensor) else value  # every rank joins
                if not torch.isfinite(full).all():  # every rank holds the whole tensor, so all refuse together
                    raise CheckpointError(f"{name} holds NaN or inf values: a diverged model; export a checkpoint from before it")
                if rank0:
                    tensors[name] = full.detach().to("cpu", torch_dtype).contiguous()
            if rank0:
                save_file(tensors, os.path.join(partial, file), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(names, file))
                total += sum(t.numel() * t.element_size() for t in tensors.values())
        if rank0:
            with open(os.path.join(partial, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            _write_side_files(partial, spec, model_args, torch_dtype, assets_path)
