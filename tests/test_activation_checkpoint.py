"""Activation checkpointing changes memory and time, never the gradients; "op" keeps attention."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from longctx.models.common.decoder import Decoder
from longctx.models.qwen3 import QWEN3_FLAGS
from longctx.parallelisms.activation_checkpoint import apply_ac
from tests.conftest import assert_rel_close, randomize_parameters
from tests.test_models import grads, pack, sum_ce, tiny_args

# One mode per block (parallelisms/settings.py BLOCK_MODES), as the config's modes and auto's mixes give them.
MODES = {"full": ("full",) * 4, "every 2nd block": ("full", "none") * 2, "op": ("op",) * 4,
         "mixed": ("full", "op", "none", "op")}


class CountAttentionForwards(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        self.count += "scaled_dot_product" in name and "backward" not in name
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "document-masked"])
def test_checkpointing_keeps_gradients_and_op_mode_skips_attention_recompute(packed):
    torch.manual_seed(0)
    reference = Decoder(tiny_args(QWEN3_FLAGS, n_layers=4))
    randomize_parameters(reference, seed=1)
    docs = [torch.randint(0, 97, (n,)) for n in (9, 15, 8)]
    tokens, labels, positions, doc_ids = pack(docs)
    doc_ids = doc_ids if packed else None
    sum_ce(reference(tokens, positions, doc_ids), labels).backward()

    recomputed = {}
    for label, checkpointing in MODES.items():
        model = copy.deepcopy(reference)
        model.zero_grad()
        apply_ac(model, checkpointing, modes=("op", "full"))
        loss = sum_ce(model(tokens, positions, doc_ids), labels)
        with CountAttentionForwards() as counter:
            loss.backward()
        recomputed[label] = counter.count
        for name, g in grads(model).items():
            assert_rel_close(g, reference.get_parameter(name.replace("._checkpoint_wrapped_module", "")).grad,
                             1e-6, f"{label}: gradient of {name}")
    # Backward re-runs the attention forward of each "full" block, never of an "op" one.
    assert recomputed == {"full": 4, "every 2nd block": 2, "op": 0, "mixed": 1}
