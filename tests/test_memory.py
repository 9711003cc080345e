"""Activation offload and the tiled MLP change where activations live, never the numbers:
same losses and gradients as without them (fp32, CPU), alone and under 2-rank FSDP / Ulysses."""

import copy
import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from longctx.models.common.decoder import Decoder, FeedForward
from longctx.models.qwen3 import QWEN3_FLAGS
from longctx.parallelisms.activation_checkpoint import apply_ac, apply_activation_offload, apply_mlp_tiling
from tests.conftest import assert_rel_close, randomize_parameters
from tests.distributed_harness import run_on_ranks
from tests.test_models import grads, pack, sum_ce, tiny_args
from tests.test_parallel import assert_matches_reference, one_process_references, overrides, train_layouts

MODES = {"full": ("full",) * 4, "every 2nd block": ("full", "none") * 2, "op": ("op",) * 4,
         "mixed": ("full", "op", "none", "op")}


class LargestMatmul(TorchDispatchMode):
    """The largest output of any matmul: [T, hidden] when the MLP runs whole."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.name().startswith(("aten::mm", "aten::addmm", "aten::bmm")):
            self.largest = max(self.largest, out.numel())
        return out


def test_tiled_mlp_matches_whole_and_never_holds_t_by_hidden():
    torch.manual_seed(0)
    whole = FeedForward(16, 40)
    tiled = copy.deepcopy(whole)
    tiled.chunk_size = 7  # 3 x 20 = 60 tokens: eight tiles of 7 and one of 4
    x = torch.randn(3, 20, 16, requires_grad=True)
    x_tiled = x.detach().clone().requires_grad_()
    grad_out = torch.randn(3, 20, 16)
    whole(x).backward(grad_out)
    with LargestMatmul() as seen:
        out = tiled(x_tiled)
        out.backward(grad_out)
    assert_rel_close(out, whole(x), 1e-6, "tiled output")
    assert_rel_close(x_tiled.grad, x.grad, 1e-6, "input gradient")
    for name in ("w1", "w2", "w3"):
        assert_rel_close(getattr(tiled, name).weight.grad, getattr(whole, name).weight.grad, 1e-6, f"{name} gradient")
    # The weight gradients are [40, 16]; the whole MLP would make [60, 40].
    assert seen.largest <= max(7 * 40, 16 * 40), f"a matmul made {seen.largest} values; a tile is {7 * 40}"


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "document-masked"])
def test_offload_and_tiling_keep_gradients(packed):
    torch.manual_seed(0)
    reference = Decoder(tiny_args(QWEN3_FLAGS, n_layers=4))
    randomize_parameters(reference, seed=1)
    tokens, labels, positions, doc_ids = pack([torch.randint(0, 97, (n,)) for n in (9, 15, 8)])
    doc_ids = doc_ids if packed else None
    ref_loss = sum_ce(reference(tokens, positions, doc_ids), labels)
    ref_loss.backward()
    for label, checkpointing in MODES.items():
        model = copy.deepcopy(reference)
        model.zero_grad()
        apply_mlp_tiling(model, 5)
        apply_ac(model, checkpointing, modes=("op", "full"))
        apply_activation_offload(model, checkpointing)
        checkpointed = [i for i, mode in enumerate(checkpointing) if mode != "none"]
        inputs = []  # weak references: the device copy of each block input must be freed after forward
        for block in model.layers.values():
            block.register_forward_pre_hook(lambda module, args: inputs.append(weakref.ref(args[0])))
        loss = sum_ce(model(tokens, positions, doc_ids), labels)
        gc.collect()
        kept = [i for i, ref in enumerate(inputs) if ref() is not None]
        assert set(kept) <= set(range(4)) - set(checkpointed), f"{label}: inputs {kept} stayed"
        # Each checkpointed block's input went to the host: one parked copy per such block.
        offload = model.layers["0"]._activation_offload
        parked = [ref() for ref in offload.pending]
        assert len(parked) == len(checkpointed), label
        assert all(copy_.host.shape == (1, 32, 48) for copy_ in parked), label
        loss.backward()
        assert not offload.pending, f"{label}: backward left copies unreloaded"
        assert_rel_close(loss.detach(), ref_loss.detach(), 1e-6, f"{label}: loss")
        for name, g in grads(model).items():
            assert_rel_close(g, reference.get_parameter(name.replace("._checkpoint_wrapped_module", "")).grad,
                             1e-5, f"{label}: gradient of {name}")


MEMORY_FLAGS = ["--activation_checkpoint.cpu_offload", "--activation_checkpoint.mlp_chunk_size", "48"]


def test_offload_and_tiling_under_fsdp_and_ulysses_match_one_process(hf_dir, tmp_path):
    """train.py's own functions, 3 steps: one plain process vs 2 ranks with offload and tiling."""
    (reference,) = one_process_references([overrides(hf_dir, str(tmp_path / "ref"), {})])
    layouts = {
        "dp2 full AC": {"dp_shard": 2, "local_batch": 1, "flags": ["--activation_checkpoint.mode", "full", *MEMORY_FLAGS]},
        "cp2 op AC": {"cp": 2, "flags": ["--activation_checkpoint.mode", "selective",
                                         "--activation_checkpoint.selective_ac_option", "op", *MEMORY_FLAGS]},
    }
    cases = [overrides(hf_dir, str(tmp_path / name.replace(" ", "_")), layout) for name, layout in layouts.items()]
    for name, result in zip(layouts, run_on_ranks(2, train_layouts, cases)):
        assert_matches_reference(result, reference, name)


@pytest.mark.parametrize("flags, message", [
    (["--activation_checkpoint.cpu_offload"], "set activation_checkpoint.mode full or selective"),
    (["--activation_checkpoint.mode", "full", "--activation_checkpoint.mlp_chunk_size", "-1"], "give 0 \\(off\\)"),
])
def test_memory_settings_that_mean_nothing_are_refused(flags, message):
    from longctx.base import ConfigError
    from longctx.config import parse_config
    from longctx.launch import validate

    with pytest.raises(ConfigError, match=message):
        validate(parse_config(["--job.config_file", "train_configs/debug.toml", *flags]))
