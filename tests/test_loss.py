"""The chunked losses equal full-logit F.cross_entropy, forward and backward, for any chunking."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from longctx.base import IGNORE_INDEX
from longctx.models.common.args import DecoderArgs
from longctx.models.common.decoder import Decoder
from longctx.models.common.loss import chunked_cross_entropy_sum, chunked_token_logprobs
from tests.conftest import assert_rel_close

B, T, DIM, VOCAB = 2, 24, 16, 53
CHUNKS = [4, 7, 24, 100]  # divides T, does not, exactly T, larger than T (and than B*T)


def make_inputs(bias: bool, seed: int = 0):
    """h [B, T, DIM] and an output projection (bias=True takes the checkpointed path, bias=False
    the fused one); labels with scattered ignores and the first 8 positions of every row ignored,
    so that small chunks hold no valid label at all."""
    torch.manual_seed(seed)
    h = torch.randn(B, T, DIM, requires_grad=True)
    output = nn.Linear(DIM, VOCAB, bias=bias)
    labels = torch.randint(0, VOCAB, (B, T))
    labels[torch.rand(B, T) < 0.2] = IGNORE_INDEX
    labels[:, :8] = IGNORE_INDEX
    return h, output, labels


def grads_of(loss: torch.Tensor, h: torch.Tensor, output: nn.Module) -> list[torch.Tensor]:
    params = [h, *output.parameters()]
    return list(torch.autograd.grad(loss, params))


def reference_sum(h, output, labels):
    return F.cross_entropy(output(h).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("bias", [False, True], ids=["fused", "checkpointed"])
@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_chunked_cross_entropy_sum_matches_full(bias, chunk_size):
    h, output, labels = make_inputs(bias)
    ref = reference_sum(h, output, labels)
    ours = chunked_cross_entropy_sum(h, output, labels, chunk_size=chunk_size)
    assert_rel_close(ours, ref, 1e-6, "loss sum")
    # train.py backpropagates loss_sum / global token count: the scale must reach the gradients.
    for name, g_ours, g_ref in zip(["h", "weight", "bias"], grads_of(ours / 7.0, h, output), grads_of(ref / 7.0, h, output)):
        assert_rel_close(g_ours, g_ref, 1e-5, f"gradient of {name}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled chunk and the fp32-output matmuls run on CUDA only")
def test_fused_loss_under_cuda_autocast_matches_autograd():
    """The GPU path (bf16 autocast over fp32 weights, each chunk compiled, dL/dW summed in the
    matmuls' fp32 accumulator) against autograd through the full bf16 logits: equal to bf16 rounding."""
    torch.manual_seed(0)
    h = torch.randn(2, 1500, 256, device="cuda", requires_grad=True)
    output = nn.Linear(256, 5000, bias=False, device="cuda")
    labels = torch.randint(0, 5000, (2, 1500), device="cuda")
    labels[torch.rand(2, 1500, device="cuda") < 0.2] = IGNORE_INDEX
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = chunked_cross_entropy_sum(h, output, labels, chunk_size=1024)
        ref = F.cross_entropy(output(h).float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    assert_rel_close(ours, ref, 1e-4, "loss sum")
    for name, g_ours, g_ref in zip(["h", "weight"], grads_of(ours / 7.0, h, output), grads_of(ref / 7.0, h, output)):
        assert g_ours.dtype == g_ref.dtype == torch.float32
        assert_rel_close(g_ours, g_ref, 1e-2, f"gradient of {name}")


@pytest.mark.parametrize("bias", [False, True], ids=["fused", "checkpointed"])
def test_all_ignored_labels_give_zero_not_nan(bias):
    h, output, labels = make_inputs(bias)
    labels[:] = IGNORE_INDEX
    loss = chunked_cross_entropy_sum(h, output, labels, chunk_size=5)
    assert loss.item() == 0.0
    for g in grads_of(loss, h, output):
        assert torch.isfinite(g).all() and not g.any()


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_chunked_token_logprobs_match_full(chunk_size):
    h, output, labels = make_inputs(bias=False, seed=1)
    ref = -F.cross_entropy(output(h).transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    ours = chunked_token_logprobs(h, output, labels, chunk_size=chunk_size)
    assert ours.shape == (B, T) and ours.dtype == torch.float32
    assert_rel_close(ours, ref, 1e-6, "token log-probs")
    assert not ours[labels == IGNORE_INDEX].any()
    weights = torch.randn(B, T)  # a policy-gradient style weighted sum
    for name, g_ours, g_ref in zip(["h", "weight", "bias"], grads_of((ours * weights).sum(), h, output),
                                   grads_of((ref * weights).sum(), h, output)):
        assert_rel_close(g_ours, g_ref, 1e-5, f"gradient of {name}")


def test_decoder_head_matches_full_logits():
    """The recipe's path: the chunked loss as the decoder's head (tied embeddings) against
    cross-entropy of the full logits, for the loss and every parameter's gradient."""
    args = DecoderArgs(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                       tie_embeddings=True, qk_norm=True)
    torch.manual_seed(0)
    model = Decoder(args)
    tokens = torch.randint(0, VOCAB, (B, T))
    _, _, labels = make_inputs(bias=False)
    head = functools.partial(chunked_cross_entropy_sum, labels=labels, chunk_size=7)
    ours = model(tokens, head=head)
    ours.backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    ref.backward()
    assert_rel_close(ours, ref, 1e-6, "loss sum")
    for n, p in model.named_parameters():
        assert_rel_close(ours_grads[n], p.grad, 1e-5, f"gradient of {n}")
