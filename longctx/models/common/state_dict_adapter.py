"""Internal <-> Hugging Face parameter names, whatever wrappers the model wears.

Each family gives one table (HF name -> ours, `{}` standing for the layer index); this class
applies it both ways and raises on any name the table does not know.
"""

import re
from typing import Any

from longctx.models.common.args import DecoderArgs

# FQN segments that torch.compile, activation checkpointing and FSDP1 insert.
WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def strip_wrappers(fqn: str) -> str:
    """'layers.0._checkpoint_wrapped_module._orig_mod.attention.wq.weight' -> 'layers.0.attention.wq.weight'."""
    return ".".join(part for part in fqn.split(".") if part not in WRAPPER_SEGMENTS)


# Shared by Qwen2 and Qwen3; families add rows (Qwen2: q/k/v biases, Qwen3: q/k norms).
DECODER_HF_TO_OURS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def _compile_table(table: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(re.escape(src).replace(r"\{\}", r"(\d+)") + "$"), dst) for src, dst in table.items()]


def _rename(name: str, rules: list[tuple[re.Pattern, str]], what: str) -> str:
    for pattern, dst in rules:
        match = pattern.match(name)
        if match:
            return dst.format(*match.groups())
    raise KeyError(f"unexpected {what} parameter {name!r}: no mapping for it (wrong model family or architecture?)")


class DecoderStateDictAdapter:
    """to_hf / from_hf, the two methods of torchtitan's StateDictAdapter protocol (its HF storage
    reader is not used: checkpoint/hf.py reads safetensors itself)."""
    hf_to_ours: dict[str, str] = DECODER_HF_TO_OURS

    def __init__(self, model_args: DecoderArgs):
        self.args = model_args
        self._from_hf_rules = _compile_table(self.hf_to_ours)
        self._to_hf_rules = _compile_table({ours: hf for hf, ours in self.hf_to_ours.items()})

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        hf = {}
        for name, value in state_dict.items():
            name = strip_wrappers(name)
            if self.args.tie_embeddings and name == "output.weight":
                continue  # HF stores a tied lm_head once, as embed_tokens
            hf[_rename(name, self._to_hf_rules, "model")] = value
        return hf

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        ours = {}
        for name, value in hf_state_dict.items():
            if self.args.tie_embeddings and name == "lm_head.weight":
                continue  # the output projection IS the embedding
            ours[_rename(name, self._from_hf_rules, "checkpoint")] = value
        if self.args.tie_embeddings and "tok_embeddings.weight" in ours:
            ours["output.weight"] = ours["tok_embeddings.weight"]
        return ours
