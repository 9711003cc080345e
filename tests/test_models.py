"""Our Qwen2/Qwen3 decoder against transformers (logits, both directions of the weight exchange),
packed-document attention against documents run alone, and the size tables."""

import os

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from longctx.base import IGNORE_INDEX, ConfigError
from longctx.checkpoint.hf import export_hf, load_hf_weights
from longctx.models import MODELS, get_model_spec
from longctx.models.common.args import DecoderArgs, args_from_hf_config, args_to_hf_config
from longctx.models.common.decoder import Decoder
from longctx.models.qwen2 import QWEN2_FLAGS
from longctx.models.qwen3 import QWEN3_FLAGS
from tests.conftest import TINY_HF_CONFIG, assert_rel_close, randomize_parameters

# GQA with 1, 2 and 4 kv heads, tied and untied, hidden sizes that are not powers of two.
# Qwen3 sets head_dim explicitly (hidden 40 or 56 with 4 heads of 16 or 8); Qwen2 derives it.
QWEN3_SHAPES = [
    dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True),
    dict(hidden_size=56, num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False),
    dict(hidden_size=40, num_attention_heads=8, num_key_value_heads=4, head_dim=12, tie_word_embeddings=False),
    dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=True),
]
QWEN2_SHAPES = [
    dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    dict(hidden_size=56, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
]
CASES = [("qwen3", s) for s in QWEN3_SHAPES] + [("qwen2", s) for s in QWEN2_SHAPES]
CASE_IDS = [
    f"{fam}-d{s['hidden_size']}-h{s['num_attention_heads']}-kv{s['num_key_value_heads']}-{'tied' if s['tie_word_embeddings'] else 'untied'}"
    for fam, s in CASES
]
TOL = 1e-5  # fp32 relative error (DESIGN: HF parity)


def load_ours_from_hf(path: str, family: str) -> Decoder:
    """Our decoder with HF weights, through the family's adapter and args read from config.json."""
    spec = get_model_spec(family)
    args = spec.args_for(path)
    model = Decoder(args)
    state = spec.state_dict_adapter(args).from_hf(load_file(os.path.join(path, "model.safetensors")))
    model.load_state_dict(state, strict=True)
    return model.eval()


def random_tokens(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY_HF_CONFIG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,shape", CASES, ids=CASE_IDS)
def test_logits_match_transformers(make_tiny_hf, family, shape):
    tiny = make_tiny_hf(family, **shape)
    ours = load_ours_from_hf(tiny.path, family)
    assert ours.args.tie_embeddings == shape["tie_word_embeddings"]
    tokens = random_tokens(2, 19)
    with torch.no_grad():
        assert_rel_close(ours(tokens), tiny.model(tokens).logits, TOL, f"{family} logits vs transformers")


@pytest.mark.parametrize("family,shape", [CASES[1], CASES[5]], ids=[CASE_IDS[1], CASE_IDS[5]])
def test_positions_and_packing_match_transformers(make_tiny_hf, family, shape):
    """Offset positions (what a context-parallel rank sees) and packed rows (transformers detects
    documents where position_ids restart, but only without a KV cache: use_cache=False)."""
    tiny = make_tiny_hf(family, **shape)
    ours = load_ours_from_hf(tiny.path, family)
    tokens = random_tokens(1, 24, seed=1)
    offset = torch.arange(24)[None] + 13
    lengths = [5, 11, 8]
    packed_pos = torch.cat([torch.arange(n) for n in lengths])[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        hf_offset = tiny.model(tokens, position_ids=offset, use_cache=False).logits
        assert_rel_close(ours(tokens, offset), hf_offset, TOL, "offset positions")
        hf_packed = tiny.model(tokens, position_ids=packed_pos, use_cache=False).logits
        assert_rel_close(ours(tokens, packed_pos, doc_ids), hf_packed, TOL, "packed documents")
        # The two references must differ, or the packed comparison would prove nothing.
        assert (hf_packed - tiny.model(tokens, use_cache=False).logits).abs().max() > 1e-3


def test_load_hf_weights_from_meta_matches_transformers(make_tiny_hf):
    """train.py's path: build on meta, to_empty, then checkpoint.hf.load_hf_weights."""
    family, shape = CASES[0]
    tiny = make_tiny_hf(family, **shape)
    spec = get_model_spec(family)
    args = spec.args_for(tiny.path)
    with torch.device("meta"):
        ours = Decoder(args)
    ours.to_empty(device="cpu")
    load_hf_weights(ours, spec.state_dict_adapter(args), tiny.path)
    assert ours.output.weight is ours.tok_embeddings.weight  # still tied after loading
    tokens = random_tokens(2, 17)
    with torch.no_grad():
        assert_rel_close(ours.eval()(tokens), tiny.model(tokens).logits, TOL, "meta + load_hf_weights")


@pytest.mark.parametrize("family,shape", [CASES[0], CASES[1], CASES[5]], ids=[CASE_IDS[0], CASE_IDS[1], CASE_IDS[5]])
def test_export_opens_in_transformers_with_same_logits(tmp_path, family, shape):
    """Ours -> sharded HF safetensors + index + config.json -> AutoModelForCausalLM.from_pretrained:
    same logits. A tiny shard size forces several files, as a real 8B export writes."""
    spec = get_model_spec(family)
    hf_cfg = transformers.AutoConfig.for_model(family, **(TINY_HF_CONFIG | shape))
    args = args_from_hf_config(hf_cfg.to_dict(), **spec.family_flags)
    ours = Decoder(args)
    randomize_parameters(ours, seed=3)
    ours.eval()
    out = tmp_path / "export"
    export_hf(ours, spec, args, str(out), dtype="float32", max_shard_gb=20e-6)
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="sdpa").eval()
    assert reloaded.config.model_type == family
    assert reloaded.config.tie_word_embeddings == shape["tie_word_embeddings"]
    tokens = random_tokens(2, 19, seed=2)
    with torch.no_grad():
        assert_rel_close(reloaded(tokens).logits, ours(tokens), TOL, "exported checkpoint in transformers")


# --- packed documents: no attention across document boundaries, forward and backward ---------

def tiny_args(flags: dict, **changes) -> DecoderArgs:
    base = dict(vocab_size=97, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, head_dim=12,
                rope_theta=10000.0, max_seq_len=256, tie_embeddings=False)
    return DecoderArgs(**(base | flags | changes))


def pack(docs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """tokens, labels (shifted within each document), position_ids, document_ids, each [1, T]."""
    labels = [torch.cat([d[1:], torch.tensor([IGNORE_INDEX])]) for d in docs]
    positions = [torch.arange(len(d)) for d in docs]
    doc_ids = [torch.full((len(d),), i) for i, d in enumerate(docs)]
    return tuple(torch.cat(parts)[None] for parts in (docs, labels, positions, doc_ids))


def sum_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("flags", [QWEN3_FLAGS, QWEN2_FLAGS], ids=["qwen3", "qwen2"])
def test_packed_documents_equal_documents_alone(flags):
    torch.manual_seed(0)
    model = Decoder(tiny_args(flags))
    randomize_parameters(model, seed=1)
    lengths = [7, 13, 10]
    docs = [torch.randint(0, 97, (n,)) for n in lengths]
    tokens, labels, positions, doc_ids = pack(docs)

    packed_logits = model(tokens, positions, doc_ids)
    sum_ce(packed_logits, labels).backward()
    packed_grads = grads(model)

    model.zero_grad()
    alone_logits = []
    for doc in docs:
        logits = model(doc[None])
        sum_ce(logits, pack([doc])[1]).backward()  # gradients accumulate over documents
        alone_logits.append(logits.detach())
    for i, (part, alone) in enumerate(zip(packed_logits.detach().split(lengths, dim=1), alone_logits)):
        assert_rel_close(part, alone, 1e-5, f"logits of document {i}")
    for name, g in grads(model).items():
        assert_rel_close(packed_grads[name], g, 1e-5, f"gradient of {name}")

    # Without document_ids the later documents see the earlier ones: the check above can fail.
    leaky = model(tokens, positions).detach().split(lengths, dim=1)[1]
    assert (leaky - alone_logits[1]).abs().max() > 1e-3


# --- args: size tables, parameter counts, HF config.json exchange ----------------------------

def test_qwen3_06b_has_596m_parameters():
    n = MODELS["qwen3"].flavors["0.6B"].num_params()
    assert n == 596_049_920, f"Qwen3-0.6B num_params={n:,}; the published model has 596,049,920"


FLAVORS = [(family, name) for family, spec in MODELS.items() for name in spec.flavors]


@pytest.mark.parametrize("family,flavor", FLAVORS, ids=[f"{f}-{n}" for f, n in FLAVORS])
def test_flavor_matches_transformers_model_built_from_its_config(family, flavor):
    """args -> config.json -> transformers' config and model (on meta): same args, same parameter count."""
    spec = MODELS[family]
    args = spec.flavors[flavor]
    hf_cfg = transformers.AutoConfig.for_model(family, **args_to_hf_config(args))
    assert args_from_hf_config(hf_cfg.to_dict(), **spec.family_flags) == args
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    hf_count = sum(p.numel() for p in hf_model.parameters())  # counts a tied weight once
    assert args.num_params() == hf_count, f"{family} {flavor}: num_params {args.num_params():,} vs transformers {hf_count:,}"


@pytest.mark.parametrize("flags", [QWEN3_FLAGS, QWEN2_FLAGS], ids=["qwen3", "qwen2"])
@pytest.mark.parametrize("tied", [True, False])
def test_num_params_counts_the_module(flags, tied):
    args = tiny_args(flags, tie_embeddings=tied)
    with torch.device("meta"):
        model = Decoder(args)
    assert args.num_params() == sum(p.numel() for p in model.parameters())
    assert args.num_params(include_embedding=False) == args.num_params() - args.vocab_size * args.dim * (1 if tied else 2)


def test_published_configs_give_our_flavors():
    """Fields of the published config.json files (huggingface.co/Qwen/*/config.json)."""
    qwen3_06b = dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                     rope_theta=1000000, rope_scaling=None, max_position_embeddings=40960, tie_word_embeddings=True)
    qwen25_7b = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     rope_scaling=None, max_position_embeddings=32768, tie_word_embeddings=False)
    assert args_from_hf_config(qwen3_06b, **QWEN3_FLAGS) == MODELS["qwen3"].flavors["0.6B"]
    assert args_from_hf_config(qwen25_7b, **QWEN2_FLAGS) == MODELS["qwen2"].flavors["2.5-7B"]


def test_unsupported_hf_configs_are_refused(tmp_path):
    cfg = args_to_hf_config(MODELS["qwen3"].flavors["0.6B"]) | {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}
    cfg.pop("rope_parameters")
    with pytest.raises(ConfigError, match="dynamic"):
        args_from_hf_config(cfg, **QWEN3_FLAGS)
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama", "hidden_size": 8}')
    with pytest.raises(ConfigError, match="llama"):
        MODELS["qwen3"].args_for(str(tmp_path))
    with pytest.raises(ConfigError, match="nope"):
        MODELS["qwen2"].args_for("nope")
