"""Forward + backward speed of each SDPA kernel for causal GQA on this GPU (Qwen3: 16 q / 8 kv heads),
or with --memory T [T ...] the memory each kernel's backward adds at those lengths.

    python benchmarks/probe_attention.py
    python benchmarks/probe_attention.py --memory 262144 524288 1048576 [--heads 32 8] [--groups 1 8]

What models/common/attention.py's kernel order (SDPA_BACKENDS) rests on; docs/performance.md
holds the last measurement.
"""

import argparse
import time

import torch


def sync(device) -> None:
    torch.cuda.synchronize(device)


def free() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def probe_attention(device):
    """Forward+backward time of causal GQA SDPA (Qwen3: 16 q heads, 8 kv heads, head_dim 128)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print(f"SDPA causal GQA fwd+bwd, bf16, H=16 KV=8 D=128 | {torch.cuda.get_device_name()} | torch {torch.__version__}")
    print(f"{'kernel':<22}{'kv':<9}{'T':>7}{'ms':>9}{'TFLOP/s':>9}")
    for seq in (8192, 32768):
        flops = 3.5 * 2 * 2 * 16 * 128 * seq * seq / 2  # causal: half of QK^T and PV; backward ~2.5x forward
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            for gqa in (True, False):
                q = torch.randn(1, 16, seq, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
                kv_heads = 8 if gqa else 16
                k, v = (torch.randn(1, kv_heads, seq, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
                        for _ in range(2))
                label = "enable_gqa" if gqa else "expanded"
                try:
                    def run():
                        with sdpa_kernel([backend]):
                            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                        out.backward(torch.ones_like(out))
                    for _ in range(2):
                        run()
                    sync(device)
                    start, n = time.perf_counter(), 5
                    for _ in range(n):
                        run()
                    sync(device)
                    ms = (time.perf_counter() - start) / n * 1e3
                    print(f"{backend.name:<22}{label:<9}{seq:>7}{ms:>9.2f}{flops / ms / 1e9:>9.0f}", flush=True)
                except RuntimeError as e:
                    print(f"{backend.name:<22}{label:<9}{seq:>7}  unavailable: {str(e).splitlines()[0][:80]}")
                q = k = v = None
                free()


def probe_backward_memory(device, seqs: list[int], heads: int, kv_heads: int, groups: list[int]):
    """Bytes per token that the model's attention kernel (models/common/attention.py, cuDNN first)
    adds in backward above q, k, v, the output and its statistics, whole and by kv-head group:
    what planner/memory.py's attention_backward_per_token models."""
    from longctx.models.common.attention import attention_kernel

    print(f"attention_kernel causal backward memory, bf16, H={heads} KV={kv_heads} D=128 | {torch.cuda.get_device_name()} | "
          f"torch {torch.__version__}")
    print(f"{'kv-head groups':<16}{'T':>9}{'fwd B/token':>13}{'bwd B/token':>13}")
    for seq in seqs:
        for group in groups:
            try:
                q = torch.randn(1, seq, heads, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
                k, v = (torch.randn(1, seq, kv_heads, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
                        for _ in range(2))
                free()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                out = attention_kernel(q, k, v, None, kv_groups=group)
                sync(device)
                fwd = torch.cuda.max_memory_allocated(device) - before
                held = torch.cuda.memory_allocated(device)  # inputs, output, statistics
                torch.cuda.reset_peak_memory_stats(device)
                out.backward(torch.ones_like(out))
                sync(device)
                bwd = torch.cuda.max_memory_allocated(device) - held
                print(f"{group:<16}{seq:>9}{fwd / seq:>13.0f}{bwd / seq:>13.0f}", flush=True)
            except RuntimeError as e:
                print(f"{group:<16}{seq:>9}  failed: {str(e).splitlines()[0][:80]}")
            q = k = v = out = None
            free()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory", type=int, nargs="+", metavar="T", help="measure backward memory at these lengths instead")
    p.add_argument("--heads", type=int, nargs=2, default=(16, 8), metavar=("Q", "KV"), help="with --memory")
    p.add_argument("--groups", type=int, nargs="+", default=[1], help="with --memory: kv-head groups to measure")
    args = p.parse_args()
    if args.memory:
        probe_backward_memory(torch.device("cuda"), args.memory, *args.heads, args.groups)
    else:
        probe_attention(torch.device("cuda"))
