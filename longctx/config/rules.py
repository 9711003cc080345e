"""VALUE_RULES: every value a job config may not hold, checked before any work starts.

A value of the wrong type is refused first (check_types: each key against its annotation), then
each rule in order: `<key>=<value> must be <requirement>`, one line naming the key the user must
change. A rule on `section.key.name` checks that entry of a table (model.rope_scaling), when present.
A rule may apply only `when` its section is on; rules on one key run in order, so a later one may
assume the earlier ones passed."""

import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

from longctx.base import MAX_SEQ_LEN, ConfigError
from longctx.config.parse import conforms, expected, keys
from longctx.config.schema import JobConfig


class Rule(NamedTuple):
    key: str
    accepts: Callable[[Any, JobConfig], bool]
    requirement: str | Callable[[JobConfig], str]  # completes "<key>=<value> must be ..."
    when: Callable[[JobConfig], bool] = lambda c: True


def _number(low: float = -math.inf, high: float = math.inf, low_open: bool = False, high_open: bool = False):
    """A finite int or float (never a bool) in [low, high], ends open where asked."""
    def accepts(v, c) -> bool:
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and (v > low if low_open else v >= low) and (v < high if high_open else v <= high))
    return accepts


def _integer(low: int, high: float = math.inf):
    return lambda v, c: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _unset_or(accepts):
    return lambda v, c: v is None or accepts(v, c)


def _auto_or(accepts):
    """-1 means "derive it" (the training value, the ranks left over, the largest split)."""
    return lambda v, c: v == -1 or accepts(v, c)


def _folder_under_dump(v, c) -> bool:
    """The folder, or its nearest existing parent, is a folder: a file there fails the first save, steps in."""
    path = os.path.abspath(os.path.join(c.job.dump_folder, v))
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.path.isdir(path)


def _pairs(v, c) -> bool:
    return (isinstance(v, list) and len(v) > 0 and all(isinstance(stage, list) and len(stage) == 2 for stage in v)
            and all(isinstance(x, int) and not isinstance(x, bool) for stage in v for x in stage))


def _recompile_limit() -> int:
    import torch._dynamo  # only for compiled runs with a schedule: the import costs a second

    return torch._dynamo.config.recompile_limit


def _compile_backends() -> list[str]:
    import torch._dynamo

    return torch._dynamo.list_backends(exclude_tags=())  # also the ones a caller registered


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _is_on(section: str, *switches: str):
    return lambda c: any(getattr(getattr(c, section), s) for s in switches)


def _scheduled(c: JobConfig) -> bool:
    return c.training.seq_len_schedule is not None


def _selective(c: JobConfig) -> bool:
    return c.activation_checkpoint.mode == "selective"

SEQ_LEN = f">= 1 and <= 2**24 = {MAX_SEQ_LEN} (RoPE positions are fp32, exact only up to 2**24)"
FOLDER = "a folder name under job.dump_folder, not an existing file there (nor under one)"
VALUE_RULES = (
    Rule("job.dump_folder", lambda v, c: not os.path.isfile(v), "a folder, not a file"),
    # model.rope_scaling: the entries transformers reads (models/common/rope.py checks type and names).
    Rule("model.rope_scaling.type", lambda v, c: isinstance(v, str), 'a string: "yarn", "linear" or "default"'),
    Rule("model.rope_scaling.rope_type", lambda v, c: isinstance(v, str), 'a string: "yarn", "linear" or "default"'),
    Rule("model.rope_scaling.factor", _number(1), "a finite number >= 1 (the context extension ratio)"),
    Rule("model.rope_scaling.original_max_position_embeddings", _integer(1), "an integer >= 1 (the pretraining context length)"),
    Rule("model.rope_scaling.attention_factor", _number(0, low_open=True), "a finite number > 0"),
    Rule("model.rope_scaling.beta_fast", _number(0, low_open=True), "a finite number > 0 (rotations: extrapolate above it)"),
    Rule("model.rope_scaling.beta_slow", _number(0, low_open=True), "a finite number > 0 (rotations: interpolate below it)"),
    Rule("model.rope_scaling.beta_fast", lambda v, c: v > c.model.rope_scaling.get("beta_slow", -math.inf),
         lambda c: f"> model.rope_scaling.beta_slow={c.model.rope_scaling['beta_slow']!r} (the ramp runs from fast down to slow)"),
    Rule("model.rope_scaling.mscale", _number(0, low_open=True), "a finite number > 0"),
    Rule("model.rope_scaling.mscale_all_dim", _number(0, low_open=True), "a finite number > 0"),
    Rule("model.rope_scaling.truncate", lambda v, c: isinstance(v, bool), "true or false"),
    Rule("training.steps", _integer(1), ">= 1 (the optimizer steps to run; 0 would train nothing)"),
    Rule("training.seq_len", _integer(1, MAX_SEQ_LEN), SEQ_LEN),
    Rule("training.local_batch_size", _integer(1), ">= 1"),
    Rule("training.global_batch_size", _auto_or(_integer(1)), "-1 (local_batch_size x dp) or >= 1"),
    Rule("training.gc_freq", _integer(1), ">= 1 (steps between Python garbage collections)"),
    Rule("training.max_norm", _number(0, low_open=True), "a finite number > 0 (gradient clipping)"),
    Rule("training.skip_nonfinite_steps", _integer(0), ">= 0 (non-finite steps the run may skip)"),
    Rule("training.seq_len_schedule", _pairs, "a non-empty list of [step, seq_len] integer pairs, e.g. [[0, 32768], [2000, 65536]]",
         when=_scheduled),
    Rule("training.seq_len_schedule", lambda v, c: v[0][0] == 0 and all(a[0] < b[0] for a, b in zip(v, v[1:])),
         "[step, seq_len] pairs whose steps start at 0 and increase", when=_scheduled),
    Rule("training.seq_len_schedule", lambda v, c: min(s[1] for s in v) >= 1 and max(s[1] for s in v) == c.training.seq_len,
         lambda c: f"[step, seq_len] pairs whose lengths are >= 1 and whose largest equals training.seq_len={c.training.seq_len}",
         when=_scheduled),
    # Each stage compiles each block once at its own static shapes (parallelisms/compile.py); past
    # dynamo's recompile limit a block would silently fall back to eager.
    Rule("training.seq_len_schedule", lambda v, c: len(v) <= _recompile_limit(),
         lambda c: f"at most {_recompile_limit()} stages under compile.enable (torch.compile's recompile limit); use fewer stages",
         when=lambda c: _scheduled(c) and c.compile.enable),
    Rule("parallelism.data_parallel_replicate_degree", _integer(1), ">= 1"),
    Rule("parallelism.data_parallel_shard_degree", _auto_or(_integer(1)), "-1 (the ranks the other degrees leave) or >= 1"),
    Rule("parallelism.tensor_parallel_degree", _integer(1), ">= 1"),
    Rule("parallelism.context_parallel_degree", _integer(1), ">= 1"),
    Rule("parallelism.context_parallel_ulysses_degree", _auto_or(_integer(1)), "-1 (the largest the heads allow) or >= 1"),
    Rule("checkpoint.folder", _folder_under_dump, FOLDER, when=_is_on("checkpoint", "enable")),
    Rule("checkpoint.interval", _integer(1), ">= 1 (steps between saves)"),
    Rule("checkpoint.keep_latest_k", lambda v, c: v == 0 or v >= 2,
         "0 (keep all) or >= 2: with 1, no complete checkpoint would exist while the next one is written"),
    Rule("checkpoint.load_step", _auto_or(_integer(0)), "-1 (the latest) or a saved step"),
    Rule("checkpoint.export_interval", _integer(0), ">= 0 (0: never)"),
    Rule("checkpoint.export_max_shard_gb", _number(0, low_open=True), "a finite number > 0"),
    Rule("activation_checkpoint.selective_ac_option", lambda v, c: v == "op" or (v.isdigit() and int(v) >= 1),
         "N >= 1 to checkpoint every N-th block, or 'op' to keep only attention outputs", when=_selective),
    Rule("activation_checkpoint.cpu_offload", lambda v, c: not v or c.activation_checkpoint.mode != "none",
         "false while activation_checkpoint.mode is none (it parks checkpointed block inputs): "
         "set activation_checkpoint.mode full or selective"),
    Rule("activation_checkpoint.mlp_chunk_size", _integer(0), ">= 0: give 0 (off) or the tokens per tile"),
    Rule("activation_checkpoint.attention_kv_groups", _integer(1), "an integer >= 1 (1: all kv heads at once)"),
    Rule("activation_checkpoint.memory_budget_gib", _number(0), "a finite number >= 0 (0: the GPU's memory less 10%)"),
    Rule("activation_checkpoint.mlp_chunk_size", lambda v, c: v == 0 or c.parallelism.tensor_parallel_degree == 1,
         "0 under tensor parallel (which already splits the MLP's hidden_dim by tp)"),
    Rule("compile.backend", lambda v, c: v in _compile_backends(), "a torch.compile backend, e.g. inductor, aot_eager or eager",
         when=_is_on("compile", "enable")),
    Rule("optimizer.lr", _number(0), "a finite number >= 0"),
    Rule("optimizer.beta1", _number(0, 1, high_open=True), "a number in [0, 1)"),
    Rule("optimizer.beta2", _number(0, 1, high_open=True), "a number in [0, 1)"),
    Rule("optimizer.eps", _number(0), "a finite number >= 0"),
    Rule("optimizer.weight_decay", _number(0), "a finite number >= 0"),
    Rule("lr_scheduler.warmup_steps", _integer(0), ">= 0"),
    Rule("lr_scheduler.total_steps", _unset_or(_integer(1)), ">= 1 (unset: training.steps)"),
    Rule("lr_scheduler.decay_ratio", _unset_or(_number(0, 1)), "a number in [0, 1] (unset: decay after warmup)"),
    Rule("lr_scheduler.min_lr_factor", _number(0, 1), "a number in [0, 1]"),
    Rule("metrics.log_freq", _integer(1), ">= 1 (steps between logged lines)"),
    Rule("metrics.save_tb_folder", _folder_under_dump, FOLDER, when=_is_on("metrics", "enable_tensorboard")),
    Rule("comm.init_timeout_seconds", _integer(1), ">= 1"),
    # init_weights seeds each parameter's generator with seed x 1,000,003 + its index, in 64 bits.
    Rule("debug.seed", _unset_or(_integer(0, 2**32 - 1)), ">= 0 and < 2**32"),
    Rule("debug.deterministic_warn_only", lambda v, c: not v or c.debug.deterministic,
         "false unless debug.deterministic is true (it relaxes deterministic mode)"),
    # Existence is the data reader's to check, as for training.dataset_path (launch.validate opens both).
    Rule("validation.dataset_path", lambda v, c: bool(v), "a file or folder of held-out documents (validation.enable is true)",
         when=_is_on("validation", "enable")),
    Rule("validation.freq", _integer(1), ">= 1 (steps between evaluations)", when=_is_on("validation", "enable")),
    Rule("validation.steps", _integer(1), ">= 1 (batches per evaluation)", when=_is_on("validation", "enable")),
    Rule("validation.local_batch_size", _auto_or(_integer(1)), ">= 1 (or -1: the training value)", when=_is_on("validation", "enable")),
    Rule("validation.seq_len", _auto_or(_integer(1, MAX_SEQ_LEN)), "-1 (the training value) or " + SEQ_LEN,
         when=_is_on("validation", "enable")),
    Rule("profiling.profile_freq", _integer(1), ">= 1 (steps per profiling cycle)",
         when=_is_on("profiling", "enable_profiling", "enable_memory_snapshot")),
    Rule("profiling.profiler_active", _integer(1), ">= 1 (steps recorded per cycle)", when=_is_on("profiling", "enable_profiling")),
    Rule("profiling.profiler_warmup", _integer(0), ">= 0", when=_is_on("profiling", "enable_profiling")),
    Rule("profiling.profile_freq", lambda v, c: v >= c.profiling.profiler_warmup + c.profiling.profiler_active,
         lambda c: f">= profiler_warmup + profiler_active = {c.profiling.profiler_warmup} + {c.profiling.profiler_active} "
                   "(each cycle warms up, then records)", when=_is_on("profiling", "enable_profiling")),
    Rule("profiling.save_traces_folder", _folder_under_dump, FOLDER, when=_is_on("profiling", "enable_profiling")),
    Rule("profiling.enable_memory_snapshot", lambda v, c: not v or _has_cuda(),
         "false on a machine without CUDA (it records the CUDA caching allocator)"),
    Rule("profiling.save_memory_snapshot_folder", _folder_under_dump, FOLDER, when=_is_on("profiling", "enable_memory_snapshot")),
    Rule("recipe.text_field", lambda v, c: v != "", "a column name"),
    Rule("recipe.messages_field", lambda v, c: v != "", "a column name"),
    Rule("recipe.loss_chunk_size", _integer(1), ">= 1 (tokens per cross-entropy chunk)"),
    Rule("recipe.clip_eps", _number(0, low_open=True), "a finite number > 0 (PPO's clip range)"),
)

_MISSING = object()


def _lookup(config: JobConfig, key: str):
    """The value of section.key, or of the entry section.key.name of a table (_MISSING when absent)."""
    section, name, *entry = key.split(".")
    value = getattr(getattr(config, section), name)
    if entry:
        return value.get(entry[0], _MISSING) if isinstance(value, dict) else _MISSING
    return value


def check_types(config: JobConfig) -> None:
    """Each key's value against its annotation (for configs built or changed in Python; the parser already checks)."""
    for section in keys(config):
        values = getattr(config, section)
        for key, f in keys(values).items():
            value = getattr(values, key)
            if not conforms(value, f.type):
                raise ConfigError(f"{section}.{key}={value!r} must be {expected(f.type)}")


def check_values(config: JobConfig) -> None:
    for rule in VALUE_RULES:
        if not rule.when(config):
            continue
        value = _lookup(config, rule.key)
        if value is not _MISSING and not rule.accepts(value, config):
            requirement = rule.requirement(config) if callable(rule.requirement) else rule.requirement
            raise ConfigError(f"{rule.key}={value!r} must be {requirement}")


def check_config(config: JobConfig) -> None:
    """Every key's type, then every rule: one ConfigError line for the first bad value."""
    check_types(config)
    check_values(config)
