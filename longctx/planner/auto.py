"""activation_checkpoint.mode = "auto": the fastest settings whose planned peak fits the card.

Every candidate is a ModelSettings (parallelisms/settings.py): a mode per block (the first k blocks
"full", the next m "op", the rest "none": any mix, finer than every-N), with or without MLP tiles,
activation offload, attention in kv-head groups, FSDP resharding, on one rank FSDP or plain
autocast, and the loss chunk (recipe.loss_chunk_size or a half or a quarter of it). The planner
(memory.py) prices each one's peak; of those under the budget, the one with the least estimated
step time wins. The budget is the card's memory less MARGIN: the planner came within 10% of the
measured peak on every configuration measured (docs/performance.md).

The time estimate only has to rank candidates: model flops (forward and backward, with what each
mode recomputes) at the card's matmul rate, plus the bytes FSDP's casts and copies move on top of
autocast's and the fp32 dL/dW sum each loss chunk re-reads, at its memory bandwidth. Offload and
head groups get a small price so that they are chosen only when they are needed to fit.
"""

import dataclasses
import itertools
from dataclasses import dataclass

from longctx.models.common.args import DecoderArgs
from longctx.parallelisms.settings import ModelSettings
from longctx.planner.memory import Layout, plan_memory

MARGIN = 0.10
MLP_TILE = 16384  # tokens per MLP tile when tiles are needed (as measured on the H100: docs/performance.md)
MATMUL_FLOPS = 750e12  # bf16 dense rate an H100/H200 reaches in our step's matmuls
MEMORY_BYTES_PER_S = 3.0e12
LOSS_CHUNK_HALVINGS = 2  # auto may cut recipe.loss_chunk_size to a half or a quarter to fit
OFFLOAD_COST = 0.002  # fraction of a step: the copies run on a side stream, overlapped with compute
GROUP_COST = 0.002  # per extra kernel launch group, as a fraction of attention time


@dataclass(frozen=True)
class Choice:
    settings: ModelSettings
    peak: int  # planned bytes
    seconds: float  # estimated step time (for ranking)


def block_flops(a: DecoderArgs, layout: Layout) -> tuple[float, float, float]:
    """Forward flops of one block on this rank's share of a row: (matmuls, attention, the MLP alone)."""
    tokens = layout.batch * layout.seq_len
    share = layout.cp * layout.tp
    params = a.num_params(include_embedding=False) / a.n_layers
    linear = 2 * params * tokens / share
    attention = 2 * a.n_heads * a.head_dim * layout.seq_len * tokens / share  # QK^T and PV over the causal half
    mlp = 2 * 3 * a.dim * a.hidden_dim * tokens / share
    return linear, attention, mlp


def step_seconds(a: DecoderArgs, layout: Layout) -> float:
    linear, attention, mlp = block_flops(a, layout)
    modes = layout.block_modes(a.n_layers)
    recompute = modes.count("full") * (linear + attention) + modes.count("op") * linear
    if 0 < layout.mlp_chunk < layout.batch * layout.seq_len // layout.cp:
        recompute += a.n_layers * mlp  # the tiled MLP's backward runs each tile's forward again
    seconds = (3 * a.n_layers * (linear + attention) + recompute) / MATMUL_FLOPS
    # Bytes per parameter and step: autocast casts each weight once (4 read, 2 written) and each bf16
    # gradient once to fp32 (2 + 4); FSDP2 adds its copy-in, all-gather and copy-out per gather (twice
    # with resharding) and the reduce-scatter's copy and cast.
    bytes_per_param = 12 if not layout.fsdp else 12 + 8 * (2 if layout.reshard_after_forward else 1) + 10
    seconds += bytes_per_param * a.num_params() / (layout.dp_shard * layout.cp * layout.tp) / MEMORY_BYTES_PER_S
    # Each loss chunk adds its share of dL/dW into the fp32 sum, reading it (models/common/loss.py).
    chunks = -(-layout.batch * layout.seq_len // layout.cp // layout.loss_chunk)
    seconds += chunks * 4 * a.vocab_size * a.dim / layout.tp / MEMORY_BYTES_PER_S
    seconds *= 1 + (OFFLOAD_COST if layout.activation_offload else 0)
    return seconds + (layout.attention_groups - 1) * GROUP_COST * a.n_layers * 3 * attention / MATMUL_FLOPS


def block_mix(n_layers: int, full: int, op: int) -> tuple[str, ...]:
    """The first `full` blocks "full", the next `op` "op", the rest "none"."""
    return ("full",) * full + ("op",) * op + ("none",) * (n_layers - full - op)


def feature_sets(base: ModelSettings, fsdp_required: bool, kv_heads: int):
    """Every combination of memory features auto may choose (its block mix left empty), given what
    the job fixed in `base` (compile, compute dtype, FSDP's CPU offload, loss parallel, a configured
    MLP tile size, the largest loss chunk)."""
    tiles = (0, base.mlp_chunk or MLP_TILE)
    groups = sorted({1, kv_heads})
    loss_chunks = sorted({max(base.loss_chunk >> i, 1) for i in range(LOSS_CHUNK_HALVINGS + 1)}, reverse=True)
    for fsdp, reshard, mlp_chunk, offload, group, loss_chunk in itertools.product(
            (True,) if fsdp_required else (False, True), (True, False), tiles, (False, True), groups, loss_chunks):
        if fsdp or reshard:  # resharding is FSDP's
            yield dataclasses.replace(base, checkpointing=(), fsdp=fsdp, reshard_after_forward=reshard, mlp_chunk=mlp_chunk,
                                      activation_offload=offload, attention_groups=group, loss_chunk=loss_chunk)


def fastest_mix(a: DecoderArgs, layout_of, features: ModelSettings, budget_bytes: float) -> Choice:
    """The fastest block mix of one feature set that fits, or its smallest (every block "full").

    Step time grows and the peak falls with every block moved from "none" to "op" or from "op" to
    "full", so for each count of "full" blocks only the fewest "op" blocks that fit can win, and
    that count never grows with the "full" count: one walk down instead of every mix. (Moving the
    first block off "none" can raise the peak, by the recomputation backward then holds, so the
    mix with no "op" block is tried on its own.)"""
    L = a.n_layers

    def mix(full: int, op: int) -> Choice | None:
        if features.activation_offload and full + op == 0:
            return None  # nothing to offload
        settings = dataclasses.replace(features, checkpointing=block_mix(L, full, op))
        layout = layout_of(settings)
        return Choice(settings, plan_memory(a, layout)[0]["peak"], step_seconds(a, layout))

    def fitting(choice: Choice | None) -> bool:
        return choice is not None and choice.peak <= budget_bytes

    best = mix(L, 0)  # the smallest peak: the answer when nothing fits

    def consider(choice: Choice | None) -> None:
        nonlocal best
        if fitting(choice) and (not fitting(best) or choice.seconds < best.seconds):
            best = choice

    op = L
    for full in range(L + 1):
        op = min(op, L - full)
        consider(mix(full, 0))
        consider(mix(full, op))
        while op > 1 and fitting(smaller := mix(full, op - 1)):
            op -= 1
            consider(smaller)
    return best


def choose(a: DecoderArgs, layout_of, base: ModelSettings, fsdp_required: bool, kv_heads: int,
           budget_bytes: float) -> list[Choice]:
    """Per combination of memory features (FSDP, resharding, tiles, offload, head groups, loss chunk): its
    fastest block mix that fits, or its smallest peak when none does; best first (fits, then time;
    the rest by peak). The first is auto's choice if it fits. layout_of(settings) -> the planner's
    Layout on the job's mesh."""
    def rank(choice: Choice) -> tuple:
        return (0, choice.seconds) if choice.peak <= budget_bytes else (1, choice.peak)

    return sorted((fastest_mix(a, layout_of, features, budget_bytes)
                   for features in feature_sets(base, fsdp_required, kv_heads)), key=rank)
