"""HF names are the same whatever wrappers the model wears; unknown names raise, naming the key."""

import copy

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from longctx.checkpoint.hf import load_hf_weights
from longctx.models import MODELS
from longctx.models.common.args import DecoderArgs
from longctx.models.common.decoder import Decoder
from longctx.models.common.state_dict_adapter import strip_wrappers
from longctx.parallelisms.activation_checkpoint import apply_ac, block_checkpointing
from longctx.parallelisms.compile import apply_compile
from tests.conftest import randomize_parameters

FAMILIES = ["qwen3", "qwen2"]


def tiny_model(family: str, tied: bool = False) -> Decoder:
    spec = MODELS[family]
    args = DecoderArgs(vocab_size=61, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=48,
                       tie_embeddings=tied, **spec.family_flags)
    torch.manual_seed(0)
    return Decoder(args)


@pytest.mark.parametrize(
    "fqn,expected",
    [
        ("layers.0.attention.wq.weight", "layers.0.attention.wq.weight"),
        ("layers.0._orig_mod.attention.wq.weight", "layers.0.attention.wq.weight"),
        ("layers.1._checkpoint_wrapped_module._orig_mod.feed_forward.w1.weight", "layers.1.feed_forward.w1.weight"),
        ("_orig_mod.layers.2.ffn_norm.weight", "layers.2.ffn_norm.weight"),  # whole-model compile
        ("_fsdp_wrapped_module.layers.0._fsdp_wrapped_module.attention_norm.weight", "layers.0.attention_norm.weight"),
        ("layers.0.my_orig_mod.weight", "layers.0.my_orig_mod.weight"),  # a name that only contains the word
    ],
)
def test_strip_wrappers(fqn, expected):
    assert strip_wrappers(fqn) == expected


def wrap_with_parallelisms(model: Decoder, ac_mode: str) -> None:
    """The order of parallelize_decoder: compile each block, then checkpoint-wrap it."""
    apply_compile(model)
    apply_ac(model, block_checkpointing(ac_mode, "2", len(model.layers)), modes=("full",))
    blocks = list(model.layers.values())
    # The wrappers really are there, or the test would compare a model with itself.
    assert any(hasattr(b, "_checkpoint_wrapped_module") for b in blocks)
    inner = [getattr(b, "_checkpoint_wrapped_module", b) for b in blocks]
    assert all(getattr(b, "_compiled_call_impl", None) is not None or hasattr(b, "_orig_mod") for b in inner)


def wrap_with_module_wrappers(model: Decoder, ac_mode: str) -> None:
    """torch.compile's OptimizedModule inside checkpoint_wrapper: parameter names gain both
    segments (the wrapper's own state-dict hook removes `_checkpoint_wrapped_module.` again)."""
    for name, block in list(model.layers.named_children()):
        model.layers.register_module(name, checkpoint_wrapper(torch.compile(block)))
    assert any("._checkpoint_wrapped_module._orig_mod." in k for k, _ in model.named_parameters())
    assert any("._orig_mod." in k for k in model.state_dict())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("wrap", [
    pytest.param(lambda m: wrap_with_parallelisms(m, "full"), id="parallelisms-full-ac"),
    pytest.param(lambda m: wrap_with_parallelisms(m, "selective"), id="parallelisms-selective-ac"),
    pytest.param(lambda m: wrap_with_module_wrappers(m, "full"), id="orig_mod-inside-checkpoint-wrapper"),
])
def test_hf_names_identical_with_compile_and_checkpoint_wrappers(family, wrap):
    plain = tiny_model(family)
    wrapped = copy.deepcopy(plain)
    wrap(wrapped)
    adapter = MODELS[family].state_dict_adapter(plain.args)
    hf_plain, hf_wrapped = adapter.to_hf(plain.state_dict()), adapter.to_hf(wrapped.state_dict())
    assert list(hf_wrapped) == list(hf_plain)
    assert all(torch.equal(hf_wrapped[k], hf_plain[k]) for k in hf_plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_hf_weights_into_wrapped_model(tmp_path, family):
    """HF weights written from a plain model load into a compiled + checkpoint-wrapped one."""
    from safetensors.torch import save_file

    source = tiny_model(family, tied=True)
    randomize_parameters(source, seed=5)
    adapter = MODELS[family].state_dict_adapter(source.args)
    save_file({k: v.contiguous() for k, v in adapter.to_hf(source.state_dict()).items()}, str(tmp_path / "model.safetensors"))
    target = tiny_model(family, tied=True)
    wrap_with_parallelisms(target, "full")
    load_hf_weights(target, adapter, str(tmp_path))
    loaded = {strip_wrappers(k): v for k, v in target.state_dict().items()}
    for name, value in source.state_dict().items():
        assert torch.equal(loaded[name], value), f"{name} differs after loading into the wrapped model"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [True, False])
def test_names_match_transformers_and_round_trip(make_tiny_hf, family, tied):
    shape = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    if family == "qwen3":
        shape["head_dim"] = 8
    tiny = make_tiny_hf(family, **shape)
    spec = MODELS[family]
    model = Decoder(spec.args_for(tiny.path))
    adapter = spec.state_dict_adapter(model.args)
    hf_names = set(tiny.model.state_dict()) - ({"lm_head.weight"} if tied else set())
    assert set(adapter.to_hf(model.state_dict())) == hf_names
    back = adapter.from_hf(adapter.to_hf(model.state_dict()))
    assert set(back) == set(model.state_dict())
    if tied:
        assert back["output.weight"] is back["tok_embeddings.weight"]


@pytest.mark.parametrize(
    "family,direction,name",
    [
        ("qwen3", "to_hf", "layers.0.attention.wq.lora_A.weight"),
        ("qwen3", "to_hf", "layers.0.attention.wq.bias"),  # Qwen2's bias: not a Qwen3 parameter
        ("qwen2", "to_hf", "layers.1.attention.q_norm.weight"),  # Qwen3's norm: not a Qwen2 parameter
        ("qwen3", "from_hf", "model.layers.0.mlp.experts.0.gate_proj.weight"),
        ("qwen3", "from_hf", "model.layers.0.self_attn.q_proj.bias"),
        ("qwen2", "from_hf", "model.layers.0.self_attn.k_norm.weight"),
        ("qwen2", "from_hf", "model.rotary_emb.inv_freq"),
    ],
)
def test_unknown_names_raise_naming_the_key(family, direction, name):
    adapter = MODELS[family].state_dict_adapter(tiny_model(family).args)
    with pytest.raises(KeyError, match=name.replace(".", r"\.")):
        getattr(adapter, direction)({name: torch.zeros(1)})
