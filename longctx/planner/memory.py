"""Per-GPU memory of a training layout, by term, from the model's dimensions alone (no model is built).

The arithmetic behind `scripts/plan.py`. It models what `torch.cuda.max_memory_allocated` sees
for this repo's own step (FSDP2 with fp32 master weights and bf16 compute, Ulysses, the fused
chunked loss), at the moments that can be the peak:

- the start of backward: the persistent state, every checkpointed block input, the loss's
  held gradients and one block's recomputed activations plus its backward working set, whose
  own peak is the larger of its two phases: the MLP's backward (its hidden-wide values, or one
  tile's) or, once those are freed, the attention kernel's (see `attention_backward_per_token`);
- the end of backward: block 0's backward while every other (sharded, fp32) gradient already
  exists (the peak of large models at short sequences: 4B at 16K on an H200);
- the optimizer step: the persistent state plus every (sharded, fp32) gradient.

Activation sizes count the tensors autograd saves per token, by name (see `saved_per_token`);
where torch.compile decides what to save, the count is the partitioner's usual choice (matmul
inputs and outputs kept, pointwise results recomputed) and the planned-vs-measured table in
docs/performance.md says how close that is. Counts are in elements; `bf16` activations.
"""

import dataclasses
import math
from dataclasses import dataclass

from longctx.models.common.args import DecoderArgs
from longctx.parallelisms.parallel_dims import ParallelDims
from longctx.parallelisms.settings import ModelSettings
from longctx.parallelisms.ulysses import kv_heads_to_send

GIB = 2**30
# Not seen by the model's terms: cuBLAS/cuDNN workspaces, NCCL buffers, the allocator's
# rounding of blocks to 512 bytes and 2 MiB segments, RoPE tables. Calibrated on the H200
# (docs/performance.md, planned vs measured); a guess until then.
FIXED_OVERHEAD_BYTES = int(0.5 * GIB)


@dataclass(frozen=True)
class Layout:
    """What decides one GPU's memory: the row, the parallel degrees and the model settings
    (parallelisms/settings.py), flat. `layout_for` builds it from what a job decided."""

    seq_len: int  # padded (ParallelDims.padded_len)
    batch: int = 1
    dp_shard: int = 1  # FSDP shards over dp_shard x cp ranks
    cp: int = 1
    cp_shard: int = 1  # cp = cp_shard (sequence shard, K/V all-gathered) x Ulysses
    tp: int = 1
    checkpointing: str | tuple[str, ...] = "full"  # settings.BLOCK_MODES per block, or one mode for every block
    cpu_offload: bool = False  # fp32 state on the host
    activation_offload: bool = False
    mlp_chunk: int = 0
    attention_groups: int = 1
    loss_chunk: int = 4096
    fsdp: bool = True  # False: one rank under autocast, every weight's bf16 copy live from forward to backward
    reshard_after_forward: bool = True
    compile: bool = True
    act_bytes: int = 2  # bf16 compute (CPU runs: fp32)

    def block_modes(self, n_layers: int) -> tuple[str, ...]:
        return (self.checkpointing,) * n_layers if isinstance(self.checkpointing, str) else self.checkpointing


def layout_for(settings: ModelSettings, parallel_dims: ParallelDims, seq_len: int, batch: int) -> Layout:
    """The layout of a job's settings on its mesh, for rows of seq_len tokens (padded here)."""
    return Layout(
        seq_len=parallel_dims.padded_len(seq_len), batch=batch, dp_shard=parallel_dims.dp_shard, cp=parallel_dims.cp,
        cp_shard=parallel_dims.cp_shard, tp=parallel_dims.tp, checkpointing=settings.checkpointing,
        cpu_offload=settings.cpu_offload, activation_offload=settings.activation_offload, mlp_chunk=settings.mlp_chunk,
        attention_groups=settings.attention_groups, loss_chunk=settings.loss_chunk, fsdp=settings.fsdp,
        reshard_after_forward=settings.reshard_after_forward, compile=settings.compile,
        act_bytes=settings.compute_dtype.itemsize,
    )


def block_params(a: DecoderArgs) -> int:
    return (a.num_params(include_embedding=False) - a.dim) // a.n_layers


def root_params(a: DecoderArgs) -> int:
    """Embedding, final norm and output projection: FSDP's root group."""
    return a.num_params() - a.n_layers * block_params(a)


def saved_per_token(a: DecoderArgs, layout: Layout) -> tuple[float, float]:
    """Elements one block saves for backward per local token when it is not checkpointed, as
    (attention half, MLP half).

    Eager, by name: x and its norm, q and k before their norms, q/k/v after RoPE, the attention
    output and its reshaped copy (wo's input), h and its norm, and the MLP's gate, up,
    silu(gate) and product. Compiled, the partitioner's choice, fitted to H100 measurements of
    0.6B and 1.7B (docs/performance.md: 22K and 38K elements per token; it keeps the matmul
    outputs and recomputes most pointwise results). The tiled MLP saves none of its hidden-wide
    values."""
    tp = layout.tp
    qd, kvd, hidden = a.n_heads * a.head_dim / tp, a.n_kv_heads * a.head_dim / tp, a.hidden_dim / tp
    dim_sp = a.dim / tp  # sequence parallel: the residual stream is split over tp
    attention = 4 * dim_sp + (2 * qd + 1.5 * kvd if layout.compile else 5 * qd + 4 * kvd)
    tiled = 0 < layout.mlp_chunk < layout.batch * layout.seq_len // layout.cp
    return attention, 0 if tiled else 4 * hidden


def attention_backward_per_token(a: DecoderArgs, layout: Layout) -> float:
    """Bytes per local token the attention kernel's backward adds while it runs, as measured for
    cuDNN (`benchmarks/probe_attention.py --memory`): the gradient of its output coming in, dq, dk
    and dv going out, the fp32 dq accumulator, one fp32 statistic per query head and, with fewer
    kv heads than query heads, dk and dv expanded to every query head before each group's sum.
    Under cp each rank attends for as many (token, head) query pairs as it holds tokens x local
    heads (Ulysses trades tokens for heads), against the K/V of its shard's whole row: the kv
    heads it received, for cp times its local tokens. With attention in G kv-head groups
    (models/common/attention.py) the kernel runs group after group: the accumulator, the
    statistics and the expanded dk/dv are one group's, while dq, dk and dv (the outputs) are whole."""
    b, ulysses = layout.act_bytes, layout.cp // layout.cp_shard
    heads = a.n_heads // layout.tp
    qd = heads * a.head_dim
    kv_heads = kv_heads_to_send(a.n_kv_heads // layout.tp, ulysses) // ulysses
    groups = math.gcd(layout.attention_groups, kv_heads)
    kvd = layout.cp * kv_heads * a.head_dim
    expanded = 2 * layout.cp * (heads // ulysses) * a.head_dim * b if kv_heads < heads // ulysses else 0
    return qd * 2 * b + 2 * kvd * b + (qd * 4 + 4 * heads + expanded) / groups


def plan_memory(a: DecoderArgs, layout: Layout) -> tuple[dict[str, int], dict[str, int]]:
    """(device terms, host terms) in bytes per GPU; the device terms include "peak"."""
    L, tp, cp, b = a.n_layers, layout.tp, layout.cp, layout.act_bytes
    shard = layout.dp_shard * cp
    tokens = layout.batch * layout.seq_len // cp  # local tokens after the Ulysses split
    n_params = a.num_params()
    state = {"fp32 weights": 4 * n_params // (shard * tp), "AdamW state": 8 * n_params // (shard * tp),
             "fp32 grads": 4 * n_params // (shard * tp)}
    host = {}
    if layout.cpu_offload:
        host.update(state)
        state = dict.fromkeys(state, 0)

    block, root = block_params(a), root_params(a)
    if layout.fsdp:
        gathered_blocks = L if not layout.reshard_after_forward else 2  # this block and the prefetched one
        gathered = b * (root + gathered_blocks * block) // tp  # FSDP2 gathers even on one GPU
        # Backward: one block's unsharded bf16 gradients and their fp32 copy for the reduce-scatter.
        comm = (b + 4) * block // tp
    else:  # autocast: every weight's bf16 copy is saved for backward; one block's bf16 gradients in flight
        gathered, comm = b * n_params, b * block

    modes = layout.block_modes(L)
    ckpt_blocks = L - modes.count("none")
    d_local = a.dim / tp  # block inputs are sequence-sharded under tp
    per_ckpt = tokens * d_local
    # "op" blocks also keep the attention output and log-sum-exp (and under cp the all-to-all outputs)
    qd, kvd = a.n_heads * a.head_dim / tp, a.n_kv_heads * a.head_dim / tp
    per_op = per_ckpt + tokens * (qd + a.n_heads / tp * 2 + (2 * qd + 2 * kvd if cp > 1 else 0))
    tiled = 0 < layout.mlp_chunk < tokens
    attention_saved, mlp_saved = saved_per_token(a, layout)
    if layout.attention_groups > 1:  # each group's output is kept for its backward, beside their concatenation
        attention_saved += qd
        per_op += tokens * qd
    block_acts = tokens * (attention_saved + mlp_saved)
    ckpt_input = tokens * d_local * b
    checkpointed = int((modes.count("full") * per_ckpt + modes.count("op") * per_op + modes.count("none") * block_acts) * b)
    if layout.activation_offload:
        host["checkpointed block inputs"] = ckpt_blocks * ckpt_input
        checkpointed -= (ckpt_blocks - 1) * ckpt_input  # the prefetched one is back on the device

    # One block's backward: the attention half of its recomputed activations (when checkpointed),
    # the gradients of the residual stream in flight and the all-to-all buffers under cp, plus
    # the larger of its two phases: first the MLP's (its recomputed hidden-wide values, or one
    # tile's fp32 values), then, those freed, the attention kernel's.
    qkv = (a.n_heads + 2 * a.n_kv_heads) * a.head_dim / tp
    in_flight = tokens * (3 * a.dim / tp + (3 * qkv if cp > 1 else 0))
    tile = min(layout.mlp_chunk, tokens) * a.hidden_dim / tp * (6 if layout.compile else 12) if tiled else 0
    recomputed = tokens * attention_saved if ckpt_blocks else 0
    mlp_phase = ((tokens * mlp_saved if ckpt_blocks else 0) + tile) * b
    backward = int((recomputed + in_flight) * b + max(mlp_phase, tokens * attention_backward_per_token(a, layout)))

    # Fused chunked loss: dL/dh (bf16) and dL/dW (fp32) held from forward to backward, and one
    # chunk's logits with their gradient while it runs (bf16 on CUDA, where the chunk is one
    # compiled kernel; eager fp32 on CPU).
    loss_chunk = min(layout.loss_chunk, tokens)
    vocab = a.vocab_size / tp
    loss_held = int(tokens * a.dim * b + 4 * a.vocab_size * a.dim // tp)
    rope = 2 * tokens * a.head_dim * b

    terms = {**state, "gathered bf16 weights": gathered, "communication buffers": comm,
             "checkpointed activations": checkpointed, "loss held for backward": loss_held,
             "one block's backward": backward, "loss chunk": int(loss_chunk * vocab * (4 if b == 2 else 12)), "RoPE tables": rope,
             "fixed overhead": FIXED_OVERHEAD_BYTES}
    # Peak: the start of backward (all grads but the root's still None), the end of the forward (the
    # loss chunk), the optimizer step, or the end of backward (below).
    root_grads = 0 if layout.cpu_offload else 4 * root // (shard * tp)
    activation_phase = sum(terms.values()) - terms["fp32 grads"] - terms["loss chunk"] + root_grads
    loss_phase = activation_phase - terms["one block's backward"] + terms["loss chunk"]
    step_phase = sum(state.values()) + gathered + FIXED_OVERHEAD_BYTES
    # The end of backward: block 0 recomputes while every other gradient already exists (fp32,
    # sharded) and the root's bf16 gradient waits for its reduce-scatter; the checkpoints of the
    # later blocks are gone.
    root_bf16_grad = b * root // tp
    end_phase = (sum(state.values()) + gathered + comm + backward + per_ckpt * b + rope + root_bf16_grad
                 + FIXED_OVERHEAD_BYTES)
    terms["peak"] = max(activation_phase, loss_phase, step_phase, end_phase)
    return terms, host


def largest_term(terms: dict[str, int]) -> str:
    return max((k for k in terms if k != "peak"), key=terms.get)


def fits(a: DecoderArgs, layout: Layout, gpu_bytes: float, host_bytes: float, gpus_per_host: int) -> bool:
    device, host = plan_memory(a, layout)
    return device["peak"] <= gpu_bytes and sum(host.values()) * gpus_per_host <= host_bytes


def longest_seq(a: DecoderArgs, layout: Layout, gpu_bytes: float, host_bytes: float, gpus_per_host: int,
                granularity: int = 1024, cap: int = 1 << 26) -> int:
    """The longest seq_len (a multiple of granularity x tp x cp) whose plan fits both budgets; 0 if none."""
    step = granularity * layout.tp * layout.cp
    at = lambda n: dataclasses.replace(layout, seq_len=n * step)  # noqa: E731
    if not fits(a, at(1), gpu_bytes, host_bytes, gpus_per_host):
        return 0
    good, bad = 1, 2
    while bad * step <= cap and fits(a, at(bad), gpu_bytes, host_bytes, gpus_per_host):
        good, bad = bad, bad * 2
    while bad - good > 1:  # memory grows with seq_len: bisect between the last fit and the first miss
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(a, at(mid), gpu_bytes, host_bytes, gpus_per_host) else (good, mid)
    return good * step
