"""The model, however it is sharded, as a Hugging Face folder that transformers and vLLM open:
model-0000K-of-0000N.safetensors + model.safetensors.index.json + config.json +
generation_config.json (+ tokenizer files when the run's hf_assets_path has them).

Every rank joins the gather of one tensor at a time (DTensor.full_tensor); only rank 0 holds the
gathered tensors of the shard file being written, never the whole model. The folder is written
as `<out>.partial` and renamed, so `<out>` exists only when complete.
"""

import json
import os
import shutil

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor

from components.checkpoint import CheckpointError, barrier, global_rank
from models.common.args import args_to_hf_config
from recipes.data import DataError, HFTokenizer, pack_greedy

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")


def hf_config(spec, model_args, dtype: torch.dtype, eos_token_id: int | None) -> dict:
    cfg = {"architectures": [spec.hf_architecture], "model_type": spec.name, **args_to_hf_config(model_args),
           "torch_dtype": str(dtype).removeprefix("torch.")}
    if eos_token_id is not None:
        cfg["eos_token_id"] = eos_token_id
    return cfg


def _eos_token_id(assets_path: str | None) -> int | None:
    try:  # the run's own reading of tokenizer_config.json
        return HFTokenizer(assets_path).eos_id if assets_path else None
    except DataError:
        return None  # no tokenizer next to the model: config.json simply names no EOS


def plan_shards(shapes: dict[str, torch.Size], itemsize: int, max_bytes: float) -> list[list[str]]:
    """Names per file, in model order, each file at most max_bytes unless one tensor is larger."""
    names = list(shapes)
    groups = pack_greedy([shapes[n].numel() * itemsize for n in names], max_bytes)
    return [[names[i] for i in group] for group in groups]


def _write_side_files(out: str, spec, model_args, dtype, assets_path: str | None) -> None:
    eos = _eos_token_id(assets_path)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config(spec, model_args, dtype, eos), f, indent=2)
    generation = os.path.join(assets_path or "", "generation_config.json")
    if assets_path and os.path.isfile(generation):
        shutil.copy(generation, out)  # a real model's sampling defaults and stop tokens
    else:
        with open(os.path.join(out, "generation_config.json"), "w") as f:
            json.dump({} if eos is None else {"eos_token_id": eos}, f, indent=2)
    for name in TOKENIZER_FILES:
        if assets_path and os.path.isfile(os.path.join(assets_path, name)):
            shutil.copy(os.path.join(assets_path, name), out)


def export_hf(model, spec, model_args, out_dir: str, dtype: str, assets_path: str | None = None,
              max_shard_gb: float = 5.0, overwrite: bool = False) -> None:
    """Collective over all ranks of the model's mesh; rank 0 writes."""
    if dtype not in DTYPES:
        raise CheckpointError(f"export dtype {dtype!r} is not one of {sorted(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    rank0 = global_rank() == 0
    if os.path.exists(out_dir) and not overwrite:
        raise CheckpointError(f"{out_dir} already exists; remove it or choose another output folder")
    hf_state = spec.state_dict_adapter(model_args).to_hf(get_model_state_dict(model))
    shards = plan_shards({n: t.shape for n, t in hf_state.items()}, torch_dtype.itemsize, max_shard_gb * 1e9)
    partial = out_dir.rstrip("/") + ".partial"
    if rank0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            value = hf_state[name]
            full = value.full_tensor() if isinstance(value, DTensor) else value  # every rank joins
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
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(partial, out_dir)
    barrier()
