"""Sequence-sharded attention against whole-row attention on one GPU (forward + backward).

    python benchmarks/bench_attention.py                      # 64K, shards 2 and 4, causal and 4K documents
    python benchmarks/bench_attention.py --seq 131072 --shards 2 4 --heads 32 --kv-heads 8

Every shard rank's work under context parallelism with a sequence shard (its two head-tail query
chunks against the whole row's K/V, parallelisms/context_parallel.py) runs one rank after another
on the one GPU, through the model's own functions (models/common/attention.py). The sum over ranks
is the attention work the sharded layout does in all; against one whole-row call it says what
sharding costs beyond splitting the work (0% is a perfect split). Communication is not included:
the multi-GPU commands in docs/performance.md measure it.
"""

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask

from longctx.models.common.attention import attention_kernel, build_attention_mask, chunked_attention
from longctx.parallelisms.context_parallel import shard_chunks

# One process plays every shard rank: each (query chunk, key length) pair is a new shape for the
# compiled flex kernel and mask builder (one training rank sees two), past dynamo's default of 8.
torch._dynamo.config.recompile_limit = 64

KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "flex": None}


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def whole_row(q, k, v, document_ids, kernel: str) -> torch.Tensor:
    """q [B, T, H, D], k/v [B, T, KV, D] -> [B, T, H, D] in one call of the named kernel. A
    document-masked row always goes through flex (SDPA would need a dense [T, T] mask)."""
    if kernel == "flex" or document_ids is not None:
        if document_ids is None:
            mask = torch.compile(create_block_mask)(causal, 1, None, q.size(1), k.size(1), device=q.device)
        else:
            mask = build_attention_mask(document_ids, [(0, q.size(1))], q.device)[0].mask
        return attention_kernel(q, k, v, mask)
    # SDPA directly: attention_kernel would set its own backend priority over this choice.
    with sdpa_kernel([KERNELS[kernel]]):
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)


def sharded(q, k, v, document_ids, shard: int) -> torch.Tensor:
    """The per-rank computation of every shard rank, one after another -> [B, T, H, D] in token order."""
    out = torch.empty_like(q)
    for rank in range(shard):
        chunks = shard_chunks(q.size(1), shard, rank)
        index = torch.cat([torch.arange(start, start + length, device=q.device) for start, length in chunks])
        out[:, index] = chunked_attention(q[:, index], k, v, build_attention_mask(document_ids, chunks, q.device))
    return out


def make_inputs(seq: int, heads: int, kv_heads: int, head_dim: int, doc_len: int, seed: int = 0):
    gen = torch.Generator("cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, seq, h, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    document_ids = None
    if doc_len:
        document_ids = (torch.arange(seq, device="cuda") // doc_len)[None]
    return q, k, v, document_ids


def time_ms(fn, q, k, v, grad_out, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of forward + backward."""
    times = []
    for i in range(warmup + iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn().backward(grad_out)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
        for t in (q, k, v):
            t.grad = None
    return sorted(times)[len(times) // 2]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4],
                        help="each shard count compiles flex for its 2*shard chunk shapes (a few seconds each)")
    parser.add_argument("--heads", type=int, default=16, help="query heads per rank (Qwen3-0.6B: 16)")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--doc-lens", type=int, nargs="+", default=[0, 4096], help="0: one document per row")
    args = parser.parse_args(argv)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; T={args.seq}, {args.heads} q / "
          f"{args.kv_heads} kv heads, head_dim {args.head_dim}, bf16, forward + backward, median of 10")
    print("| mask | path | ms | vs whole row (cuDNN; flex when document-masked) |\n|---|---|---|---|")
    for doc_len in args.doc_lens:
        q, k, v, document_ids = make_inputs(args.seq, args.heads, args.kv_heads, args.head_dim, doc_len)
        grad_out = torch.randn_like(q)
        mask_name = f"documents of {doc_len}" if doc_len else "causal"
        kernels = ["flex"] if doc_len else ["cudnn", "flash", "flex"]
        base = None
        for kernel in kernels:
            ms = time_ms(lambda: whole_row(q, k, v, document_ids, kernel), q, k, v, grad_out)
            base = base or ms
            print(f"| {mask_name} | whole row, {kernel} | {ms:.1f} | {ms / base - 1:+.1%} |")
        for shard in args.shards:
            ms = time_ms(lambda: sharded(q, k, v, document_ids, shard), q, k, v, grad_out)
            print(f"| {mask_name} | {shard} shards, sum over ranks | {ms:.1f} | {ms / base - 1:+.1%} |")


if __name__ == "__main__":
    main(sys.argv[1:])
