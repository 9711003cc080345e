"""The sequence-sharded attention path on one GPU (skips without CUDA): every shard rank's
computation, simulated one rank after another (benchmarks/bench_attention.py), equals whole-row
attention forward and backward at 32K in bf16, against the cuDNN, flash and flex kernels."""

import pytest
import torch

from benchmarks.bench_attention import make_inputs, sharded, whole_row

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SEQ = 32768
# bf16 inputs, fp32 accumulation inside every kernel: two kernels differ by bf16 rounding of the
# output (~0.4% relative) and of the gradients accumulated over 32K keys.
RTOL = 2e-2


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


def forward_backward(fn, q, k, v, grad_out):
    for t in (q, k, v):
        t.grad = None
    out = fn()
    out.backward(grad_out)
    return out.detach(), [t.grad.clone() for t in (q, k, v)]


@pytest.mark.parametrize("doc_len", [0, 4096], ids=["causal", "documents"])
@pytest.mark.parametrize("kernel", ["cudnn", "flash", "flex"])
def test_sharded_attention_equals_whole_row(kernel, doc_len):
    if doc_len and kernel != "flex":
        pytest.skip("a document-masked whole row runs on flex only")
    q, k, v, document_ids = make_inputs(SEQ, 16, 8, 128, doc_len)
    grad_out = torch.randn_like(q)
    ref_out, ref_grads = forward_backward(lambda: whole_row(q, k, v, document_ids, kernel), q, k, v, grad_out)
    for shard in (2, 4):
        out, grads = forward_backward(lambda: sharded(q, k, v, document_ids, shard), q, k, v, grad_out)
        errors = {"out": rel_error(out, ref_out), **{f"d{n}": rel_error(g, r) for n, g, r in zip("qkv", grads, ref_grads)}}
        print(f"{kernel} doc_len={doc_len} shard={shard}: relative errors {errors}")
        assert max(errors.values()) < RTOL, f"{kernel} shard {shard}: {errors}"
